"""Batched augmentation (ssl_book.augment) against a per-image torchvision/PIL pipeline doing the same operations.

Run: .venv/bin/python bench/augment.py   (prints images/s and the speed-up ratios, from one run)
"""
import torch
from PIL import Image
from torchvision import transforms as T

from common import best_of, cifar_or_synthetic, machine
from ssl_book.augment import Augmenter

N = 512
data, source = cifar_or_synthetic(N)
images = data.images                                        # uint8 [N, 3, 32, 32], as the training loop holds them

# The reference: what a classic torchvision Dataset does per image, starting from the same uint8 arrays.
weak_ref = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4, padding_mode="reflect")])
strong_ref = T.Compose([weak_ref, T.RandAugment(num_ops=2)])
to_tensor = T.ToTensor()
cutout_ref = T.RandomErasing(p=1.0, scale=(0.0, 0.25), ratio=(1.0, 1.0), value=0.5)

def pil_weak():
    return torch.stack([to_tensor(weak_ref(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in images])

def pil_strong():
    return torch.stack([cutout_ref(to_tensor(strong_ref(Image.fromarray(im.permute(1, 2, 0).numpy()))))
                        for im in images])

aug = Augmenter(seed=0)
results = {}
for name, fn in [("weak, batched (ours)", lambda: aug.weak(images)), ("weak, per-image PIL", pil_weak),
                 ("strong, batched (ours)", lambda: aug.strong(images)), ("strong, per-image PIL", pil_strong)]:
    results[name] = N / best_of(fn, repeats=5)

print(f"machine: {machine()}; {N} images of {source}")
for name, ips in results.items(): print(f"{name:<24} {ips:>10,.0f} images/s")
print(f"speed-up weak:   {results['weak, batched (ours)'] / results['weak, per-image PIL']:.1f}x")
print(f"speed-up strong: {results['strong, batched (ours)'] / results['strong, per-image PIL']:.1f}x")
