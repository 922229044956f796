"""Generating CIFAR-10-C with ssl_book.corruptions: the full benchmark, and each corruption's throughput.

Run: .venv/bin/python bench/corruptions.py [--n 10000] [--workers 2] [--per-corruption 2000]

1. make_cifar10c on the first `--n` CIFAR-10 test images: the 15 benchmark corruptions x 5 severities, written to a
   temporary folder in the released layout (files, checksums, manifest), with `--workers` processes. Wall-clock total.
2. Each corruption (all 19) in one process: corrupt_batch on `--per-corruption` images at each of the 5 severities,
   images/s; and, as the simple reference, a per-image `corrupt` loop at severity 3 on 300 images, as a ratio.
The machine's load (uptime) is printed before and after, since other jobs may share the cores.
"""
import argparse, os, subprocess, tempfile, time

import numpy as np
import torch

from common import machine
from ssl_book.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, SEVERITIES, corrupt, corrupt_batch, make_cifar10c
from ssl_book.data import load_dataset, make_synthetic

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=10_000)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--per-corruption", type=int, default=2000)
args = p.parse_args()

try:
    _, test = load_dataset("cifar10", download=False)
except ValueError:
    test = make_synthetic(n_per_class=args.n // 10 + 1, n_classes=10, size=32)
images = test.images[:args.n].permute(0, 2, 3, 1).numpy().copy()
labels = test.labels[:args.n].numpy()
uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
print(f"machine: {machine()}, {os.cpu_count()} cores; {len(images):,} test images of {test.source}")
print("load before:", uptime())

with tempfile.TemporaryDirectory() as out:
    t = time.perf_counter()
    make_cifar10c(images, labels, out, corruptions=CORRUPTIONS, severities=SEVERITIES, seed=0, workers=args.workers)
    total = time.perf_counter() - t
    size = sum(f.stat().st_size for f in os.scandir(out)) / 2**30
print(f"full benchmark: {len(CORRUPTIONS)} corruptions x 5 severities x {len(images):,} images = "
      f"{len(CORRUPTIONS) * 5 * len(images):,} images in {total / 60:.2f} min with {args.workers} worker(s) "
      f"({len(CORRUPTIONS) * 5 * len(images) / total:,.0f} images/s, {size:.2f} GiB written)")
print("load after:", uptime())

x = images[:args.per_corruption]
print(f"\nper corruption, one process, {len(x):,} images x 5 severities; per-image loop: 300 images at severity 3")
print(f"{'corruption':<18} {'batched img/s':>14} {'per-image img/s':>16} {'ratio':>6}")
for name in ALL_CORRUPTIONS:
    t = time.perf_counter()
    for s in SEVERITIES: corrupt_batch(x, name, s, seed=0)
    batched = 5 * len(x) / (time.perf_counter() - t)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for img in x[:300]: corrupt(img, name, 3, rng=rng)
    single = 300 / (time.perf_counter() - t)
    print(f"{name:<18} {batched:>14,.0f} {single:>16,.0f} {batched / single:>5.1f}x")
print("load at the end:", uptime())
