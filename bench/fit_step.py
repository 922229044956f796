"""The cost of the fit loop: a full `fit` step against a bare step of the same model on the same batches.

Run: .venv/bin/python bench/fit_step.py   (prints steps/s and the overhead ratio, from one run)

- bare, same data: index the batch, weak augmentation, forward, backward, SGD step; nothing else.
- fit: ssl_book.train.fit with the `cpu` preset's model and batch size (sampler, per-step seeding, lr schedule,
  logging, NaN check); its time excludes the one evaluation at the end, as fit's own clock does.
"""
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from common import cifar_or_synthetic, machine
from ssl_book.augment import Augmenter
from ssl_book.data import StepSampler, split
from ssl_book.experiment import make_model
from ssl_book.presets import get_preset
from ssl_book.train import Supervised, fit, make_optimizer

STEPS = 150
preset = get_preset("cpu")
data, source = cifar_or_synthetic(5000)
s = split(data.labels, 4000, seed=0)
cfg = replace(preset.fit, steps=STEPS, eval_every=STEPS, warmup=0)

def bare(steps):
    model = make_model(preset, data, 0).train()
    opt = make_optimizer(model.parameters(), cfg)
    sampler, aug = StepSampler(s.labeled, cfg.batch_size, 0), Augmenter(0)
    t = time.perf_counter()
    for step in range(steps):
        idx = sampler.batch(step)
        loss = F.cross_entropy(model(aug.weak(data.images[idx])), data.labels[idx])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return time.perf_counter() - t

def in_fit(steps):
    h = fit(Supervised(make_model(preset, data, 0)), data, s, replace(cfg, steps=steps, eval_every=steps),
            test=data.subset(range(100)), device="cpu", progress=False)
    return h.final["time_s"]

bare(10); in_fit(10)                                   # warm-up
t_bare = min(bare(STEPS) for _ in range(2))
t_fit = min(in_fit(STEPS) for _ in range(2))
print(f"machine: {machine()}; {source}; cpu preset model, batch {cfg.batch_size}, {STEPS} steps")
print(f"bare step: {STEPS / t_bare:6.2f} steps/s ({cfg.batch_size * STEPS / t_bare:,.0f} images/s)")
print(f"fit step:  {STEPS / t_fit:6.2f} steps/s ({cfg.batch_size * STEPS / t_fit:,.0f} images/s)")
print(f"fit-loop overhead: {100 * (t_fit / t_bare - 1):+.1f}%")
