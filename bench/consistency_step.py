"""What one step of each SSL method costs, against the supervised step, inside `fit`.

Run: .venv/bin/python bench/consistency_step.py [--steps 30] [--methods pi ... mixmatch]   (about 4 minutes on 2 cores
for the default, Chapter 3's methods)

The `cpu` preset's model, batch size and mu (64 labeled + mu * 64 unlabeled images per step), on CIFAR-10 if a
local copy is found. Each method runs `--steps` steps through `fit` (timed by fit's own clock, which leaves
out evaluation), best of 2 runs after a short warm-up. The ratio to the supervised step, from this one run, is
what predicts the minutes a method needs for the preset's budget: minutes = preset steps / (steps per second).
"""
import argparse
from dataclasses import replace

from common import cifar_or_synthetic, machine
from ssl_book.data import split
from ssl_book.experiment import available_methods, make_model
from ssl_book.presets import get_preset
from ssl_book.train import METHODS, fit

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--methods", nargs="+", default=["pi", "mean_teacher", "vat", "fixmatch", "uda"])
args = p.parse_args()
available_methods()                              # imports the chapters, which register their methods

preset = get_preset("cpu")
data, source = cifar_or_synthetic(6000)
s = split(data.labels, 1000, 4000, seed=0)
cfg = replace(preset.fit, steps=args.steps, eval_every=args.steps, warmup=0)

def seconds(name: str, steps: int) -> float:
    method = METHODS[name](make_model(preset, data, 0), preset)
    h = fit(method, data, s, replace(cfg, steps=steps, eval_every=steps), test=data.subset(range(100)),
            device="cpu", progress=False)
    return h.final["time_s"]

print(f"machine: {machine()}; {source}; cpu preset model, batch {cfg.batch_size}, mu {cfg.mu}, {args.steps} steps")
print(f"{'method':<13} {'steps/s':>8} {'x supervised':>13} {'minutes for ' + format(preset.fit.steps, ','):>18}")
base = None
for name in ["supervised"] + [m for m in args.methods if m != "supervised"]:     # ratios are to supervised
    seconds(name, 3)                                                  # warm-up
    t = min(seconds(name, args.steps) for _ in range(2))
    rate = args.steps / t
    base = base or t
    print(f"{name:<13} {rate:>8.2f} {t / base:>13.2f} {preset.fit.steps / rate / 60:>18.1f}", flush=True)
