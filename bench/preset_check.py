"""Does the `cpu` preset leave room for SSL to beat the baseline in about 15 minutes?

A budget check for the preset, not a chapter: a minimal FixMatch-style method (weak-view pseudo-labels above
a confidence threshold, cross-entropy on the strong view) trained with the `cpu` preset's split, model and
FitConfig, next to the supervised baseline on the same split and seed. Chapter 3 builds FixMatch properly
(`ssl_book.consistency`); this script exists so the preset's design rests on a measurement.

Run: .venv/bin/python bench/preset_check.py [--mu 2] [--ssl-only]   (needs CIFAR-10 locally or --download;
     about 30 minutes on 2 cores)
"""
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from common import machine
from ssl_book.data import load_dataset, split
from ssl_book.experiment import make_model
from ssl_book.presets import get_preset
from ssl_book.train import Method, Supervised, fit

class PseudoLabelOnStrongView(Method):
    "FixMatch's unlabeled loss in its plainest form (tau = confidence threshold, lam = its weight)."
    name = "fixmatch-check"
    uses_unlabeled = True

    def __init__(self, model, tau: float = 0.95, lam: float = 1.0):
        super().__init__(model)
        self.tau, self.lam = tau, lam

    def training_step(self, batch):
        xw, uw, us = batch.aug.weak(batch.x), batch.aug.weak(batch.u), batch.aug.strong(batch.u)
        logits = self.model(torch.cat([xw, uw, us]))          # one pass: BatchNorm sees all three parts
        lx, luw, lus = logits.split([len(xw), len(uw), len(us)])
        conf, pseudo = luw.detach().softmax(1).max(1)
        mask = (conf >= self.tau).float()
        unsup = (F.cross_entropy(lus, pseudo, reduction="none") * mask).mean()
        correct = ((pseudo == batch.u_y).float() * mask).sum() / mask.sum().clamp_min(1)
        return F.cross_entropy(lx, batch.y) + self.lam * unsup, {"mask": mask.mean(), "pseudo_acc": correct}

# Options: --mu N (unlabeled ratio; default: the preset's), --ssl-only (skip the baseline), --download.
args = sys.argv[1:]
preset = get_preset("cpu")
mu = int(args[args.index("--mu") + 1]) if "--mu" in args else preset.fit.mu
train, test = load_dataset(preset.data, download="--download" in args)
s = split(train.labels, preset.n_labeled, preset.n_unlabeled, seed=0)
print(f"machine: {machine()}; {preset.describe()}; mu {mu}; {train.source}, seed 0")
rows = {}
methods = [("supervised", Supervised), ("fixmatch-check", PseudoLabelOnStrongView)]
for name, method in methods[1:] if "--ssl-only" in args else methods:
    h = fit(method(make_model(preset, train, 0)), train, s, replace(preset.fit, seed=0, mu=mu), test, progress=False)
    rows[name] = h
    for r in h.rows:
        extra = f"  mask {r['mask']:.2f}  pseudo acc {r['pseudo_acc']:.2f}" if "mask" in r else ""
        print(f"{name:<15} step {r['step']:>5}  test acc {r['test_acc']:.4f}  {r['time_s'] / 60:5.1f} min{extra}", flush=True)
for name, h in rows.items():
    print(f"{name:<15} final test accuracy {100 * h.final['test_acc']:.2f}%  training time {h.final['time_s'] / 60:.1f} min")
