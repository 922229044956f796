"""SimCLR's views, batched (ssl_book.augment.contrastive_augment) against torchvision's per-image PIL pipeline doing
the same operations: random resized crop (area 0.2-1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale
with p = 0.2. Both start from the same uint8 arrays and end with float tensors [N, 3, 32, 32].

Run: .venv/bin/python bench/contrastive_augment.py [N]   (prints images/s and the speed-up ratio, from one run)
"""
import sys

import torch
from PIL import Image
from torchvision import transforms as T

from common import best_of, cifar_or_synthetic, machine
from ssl_book.augment import Augmenter

N = int(sys.argv[1]) if len(sys.argv) > 1 else 512
data, source = cifar_or_synthetic(N)
images = data.images                                        # uint8 [N, 3, 32, 32], as the training loop holds them

# The reference: the per-image pipeline of SimCLR's CIFAR-10 implementations (a torchvision Dataset's transform).
reference = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                       T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2), T.ToTensor()])

def per_image():
    return torch.stack([reference(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])

aug = Augmenter(seed=0)
batched = lambda: aug.contrastive(images, crop_scale=(0.2, 1.0))
assert batched().shape == per_image().shape
results = {"contrastive view, batched (ours)": N / best_of(batched, repeats=3),
           "contrastive view, per-image PIL": N / best_of(per_image, repeats=3)}
print(f"machine: {machine()}; {N} images of {source}")
for name, ips in results.items(): print(f"{name:<34} {ips:>10,.0f} images/s")
print(f"speed-up: {results['contrastive view, batched (ours)'] / results['contrastive view, per-image PIL']:.1f}x")
