"""What evaluating one model on CIFAR-10-C costs on this machine: 750,000 images (15 corruptions x 5 severities x 10,000)
for the benchmark, 950,000 with the 4 held-out corruptions.

Run: .venv/bin/python bench/robustness_cost.py [--n 10000]   (about a minute on 2 cores; pause other jobs first)

Three parts, each timed on its own, with the `cpu` preset's model (the small CNN, width 32):
1. inference: `predict` over n images of 32 x 32, in float32, and in bf16 autocast where the CPU has bf16 instructions
   (`fit` then trains in bf16 too, and `evaluate_robustness(amp=True)` evaluates the same way): the model as trained
   (batches of 1,024), and through `fast_inference` (BatchNorm folded into the convolutions, channels-last, batches
   of 128), which `evaluate_robustness` uses;
2. reading: `load_cifar10c` of one (corruption, severity) block of n images from a folder written by `make_cifar10c`
   (a memory-mapped .npy file);
3. the whole `corruption_accuracy` on that folder for one corruption at 5 severities (reading, conversion, inference).
Generating the data set is a one-off cost of its own (bench/corruptions.py). The model is untrained: the cost of a
forward pass does not depend on the weights.
"""
import argparse, tempfile, time

import numpy as np
import torch

from common import machine
from ssl_book.corruptions import corruption_accuracy, fast_inference, load_cifar10c
from ssl_book.evaluate import predict
from ssl_book.models import build_model
from ssl_book.presets import get_preset
from ssl_book.train import cpu_has_bf16

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=10000, help="images per (corruption, severity) block; CIFAR-10-C has 10,000")
args = p.parse_args()
n = args.n
preset = get_preset("cpu")
torch.manual_seed(0)
model = build_model(preset.model, **preset.model_kwargs).eval()
rng = np.random.default_rng(0)
hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)            # content does not change the cost
nchw = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()

def timed(fn, repeats: int = 2) -> float:
    fn()                                                               # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    return best

print(f"machine: {machine()}; model: {preset.model} {preset.model_kwargs}; {n:,} images per block\n")
rows = []
fast = fast_inference(model)
same = torch.allclose(predict(model, nchw[:256]), predict(fast, nchw[:256]), atol=1e-4)
for amp in ([False, True] if cpu_has_bf16() else [False]):
    s = timed(lambda: predict(model, nchw, 1024, "cpu", amp=amp))
    rows.append(("inference, " + ("bf16" if amp else "fp32") + ", as trained, batches of 1,024", n / s))
    s = timed(lambda: predict(model, nchw, 128, "cpu", amp=amp))
    rows.append(("inference, " + ("bf16" if amp else "fp32") + ", as trained, batches of 128", n / s))
    s = timed(lambda: predict(fast, nchw, 128, "cpu", amp=amp))
    rows.append(("inference, " + ("bf16" if amp else "fp32") + ", fast_inference", n / s))
with tempfile.TemporaryDirectory() as folder:
    np.save(f"{folder}/gaussian_noise.npy", np.concatenate([hwc] * 5))
    np.save(f"{folder}/labels.npy", np.tile(rng.integers(0, 10, n).astype(np.uint8), 5))
    s = timed(lambda: load_cifar10c(folder, "gaussian_noise", 3))
    rows.append(("reading one block from the folder", n / s))
    for amp in ([False, True] if cpu_has_bf16() else [False]):
        s = timed(lambda: corruption_accuracy(fast, folder, ["gaussian_noise"], batch_size=128, progress=False, amp=amp), repeats=1)
        rows.append(("corruption_accuracy, " + ("bf16" if amp else "fp32") + ", per image", 5 * n / s))

print(f"fast_inference gives the same logits (atol 1e-4): {same}\n")
print(f"{'step':<44} {'images/s':>10} {'min for 750,000':>16} {'min for 950,000':>16}")
for name, ips in rows:
    print(f"{name:<44} {ips:>10,.0f} {750_000 / ips / 60:>16.1f} {950_000 / ips / 60:>16.1f}")
