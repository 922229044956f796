"""Does training on the CPU get faster when the model's convolution weights are stored channels-last (NHWC)?

Run: .venv/bin/python bench/channels_last.py [--methods supervised fixmatch ...] [--threads 1 2] [--short 10 --long 30]
(a few minutes on 2 cores; pause other jobs first)

`fast_inference` already evaluates channels-last (bench/robustness_cost.py). Here the question is training: each method
of the `cpu` preset (its model, data, split and batch) trains through `fit` for `--short` and `--long` steps, once
with the model as built (contiguous NCHW weights) and once channels-last, as `fit` now trains it on the CPU (for the
NCHW arm, `fit`'s conversion is made a no-op while the run lasts); the
difference of the two runs' times over the difference of their steps is the cost of a step, with the fixed costs
(building, the evaluation on 200 test images) cancelled. The two layouts alternate, run after run, so that a change
in the machine's load hits both. Also printed: how far the two layouts' losses after `--short` steps are apart (the
same arithmetic in another order: float rounding, not another result).
"""
import argparse, contextlib, time
from dataclasses import replace

import torch

from common import machine
from ssl_book.data import load_dataset, split
from ssl_book.experiment import available_methods, make_model
from ssl_book.presets import get_preset
from ssl_book.train import METHODS, fit

p = argparse.ArgumentParser()
p.add_argument("--methods", nargs="+", default=["supervised", "fixmatch", "mixmatch", "rotnet"])
p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
p.add_argument("--short", type=int, default=10)
p.add_argument("--long", type=int, default=30)
args = p.parse_args()
available_methods()                               # imports the chapters, which register their methods

preset = get_preset("cpu")
train, test = load_dataset(preset.data, download=False)
test = test.subset(range(200))
s = split(train.labels, preset.n_labeled, preset.n_unlabeled, preset.n_val, seed=0)

@contextlib.contextmanager
def keep_layout():
    "While it lasts, `Module.to` ignores a memory format: `fit` then leaves the model NCHW, as it was built."
    to = torch.nn.Module.to
    def without_format(self, *a, **k):
        k.pop("memory_format", None)
        return to(self, *a, **k)
    torch.nn.Module.to = without_format
    try: yield
    finally: torch.nn.Module.to = to

def run(name: str, steps: int, layout: str) -> tuple[float, float]:
    "Seconds of `fit` for `steps` steps (warm-up off, one evaluation at the end), and the last logged loss."
    method = METHODS[name](make_model(preset, train, 0), preset)
    cfg = replace(preset.fit, steps=steps, eval_every=steps, warmup=0, seed=0, precision="fp32")
    with keep_layout() if layout == "contiguous" else contextlib.nullcontext():
        t = time.perf_counter()
        h = fit(method, train, s, cfg, test, device="cpu", progress=False)
        assert all(p.is_contiguous() != (layout == "channels_last") for p in method.model.parameters() if p.ndim == 4)
    return time.perf_counter() - t, h.final["loss"]

print(f"machine: {machine()}; {train.source}; {preset.describe()}; fp32")
print(f"runs of {args.short} and {args.long} steps; seconds per step\n")
print(f"{'method':<12} {'threads':>7} {'contiguous':>11} {'channels-last':>14} {'speed-up':>9} {'loss gap':>9}")
for threads in args.threads:
    torch.set_num_threads(threads)
    for name in args.methods:
        run(name, 3, "contiguous"); run(name, 3, "channels_last")         # warm-up: allocator, kernels
        t = {}
        for steps in (args.short, args.long):
            for layout in ("contiguous", "channels_last"):
                t[layout, steps] = run(name, steps, layout)
        per = {k: (t[k, args.long][0] - t[k, args.short][0]) / (args.long - args.short) for k in ("contiguous", "channels_last")}
        gap = abs(t["contiguous", args.short][1] - t["channels_last", args.short][1])
        print(f"{name:<12} {threads:>7} {per['contiguous']:>11.3f} {per['channels_last']:>14.3f} "
              f"{per['contiguous'] / per['channels_last']:>9.2f} {gap:>9.1e}", flush=True)
