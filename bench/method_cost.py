"""Minutes that each registered method and recipe needs for the `cpu` preset's budget, on an idle machine.

Run: .venv/bin/python bench/method_cost.py [--methods fixmatch ...] [--short 30 --long 90]   (about 10 minutes on
2 cores for every method; pause other jobs first)

The leaderboard's own minutes come from runs that shared the machine with other runs, so they do not measure
speed. Here each method runs alone, on the `cpu` preset's data, model and split (CIFAR-10 if a local copy is found,
1,000 labels and 20,000 unlabeled images), through `run_one`, the same code path as `ssl-book bench`. A run of S steps
costs a + b * S seconds: a is what does not grow with the steps (building the model, a self-training round or a
teacher labelling the 20,000-image pool, the evaluations), b is the cost of a step. Two runs, of `--short` and
`--long` steps, give a and b; the preset's minutes are (a + b * steps) / 60. Evaluation is on 200 test images, so
it adds little. Each method is warmed up with a 6-step run first.
"""
import argparse, time
from dataclasses import replace

from common import machine
from ssl_book.data import load_dataset, split
from ssl_book.experiment import available_methods, run_one
from ssl_book.presets import get_preset

p = argparse.ArgumentParser()
p.add_argument("--methods", nargs="+", default=None, help="default: every registered method and recipe")
p.add_argument("--short", type=int, default=30)
p.add_argument("--long", type=int, default=90)
args = p.parse_args()
known = available_methods()                       # imports the chapters, which register their methods and recipes
names = args.methods or [m for m in known if m != "supervised"]

preset = get_preset("cpu")
train, test = load_dataset(preset.data, download=False)
test = test.subset(range(200))
s = split(train.labels, preset.n_labeled, preset.n_unlabeled, preset.n_val, seed=0)

def seconds(name: str, steps: int) -> float:
    "Wall-clock seconds of one run of `steps` steps (no store, no checkpoints)."
    short = replace(preset, fit=replace(preset.fit, steps=steps, eval_every=steps, warmup=0))
    t = time.perf_counter()
    run_one(short, name, train, test, s, seed=0, device="cpu")
    return time.perf_counter() - t

print(f"machine: {machine()}; {train.source}; {preset.describe()}")
print(f"runs of {args.short} and {args.long} steps, after a 6-step warm-up\n")
print(f"{'method':<30} {'s per step':>10} {'fixed s':>8} {'x supervised':>13} {'minutes for ' + format(preset.fit.steps, ','):>18}")
base = None
for name in ["supervised"] + names:
    seconds(name, 6)
    t1, t2 = seconds(name, args.short), seconds(name, args.long)
    b = (t2 - t1) / (args.long - args.short)
    a = max(t1 - b * args.short, 0.0)
    minutes = (a + b * preset.fit.steps) / 60
    base = base or minutes
    print(f"{name:<30} {b:>10.3f} {a:>8.1f} {minutes / base:>13.2f} {minutes:>18.1f}", flush=True)
