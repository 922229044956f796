"""The `gpu` preset's model and settings, two steps of every registered method and recipe, on the CPU: a wrong gpu
config must not wait for a GPU to show itself."""
from dataclasses import replace

import pytest
import torch

from ssl_book.data import make_synthetic, split
from ssl_book.experiment import available_methods, run_one
from ssl_book.presets import get_preset
from ssl_book.recipes import RECIPES

@pytest.fixture(scope="module")
def cifar_like():
    full = make_synthetic(n_per_class=24, n_classes=10, channels=3, size=32, seed=0)
    return full.subset(range(200)), full.subset(range(200, 240))

def _fewest_steps(recipe) -> int:
    "The fewest steps (at least 2) that give every stage of `recipe` a step: uneven shares can need more than one per stage."
    for n in range(max(2, len(recipe.stages)), 100):
        try: recipe.budgets(n); return n
        except ValueError: continue
    raise AssertionError(f"{recipe.name}: no budget under 100 steps gives every stage a step")

@pytest.mark.parametrize("name", available_methods())
def test_gpu_preset_runs_two_steps(name, cifar_like):
    train, test = cifar_like
    preset = get_preset("gpu")
    steps = _fewest_steps(RECIPES[name](get_preset("gpu"))) if name in RECIPES else 2   # at least a step per stage
    # the preset's model (WRN-28-2), optimiser, EMA, mu and every setting, except the length and the batch size
    preset = replace(preset, fit=replace(preset.fit, steps=steps, eval_every=steps, batch_size=4, precision="fp32"))
    s = split(train.labels, 20, seed=0)
    rec = run_one(preset, name, train, test, s, seed=0, device="cpu")
    assert rec["model"] == "wrn28_2" and rec["steps"] == steps and 0 <= rec["test_acc"] <= 1
    assert rec["test_acc_ema"] is not None                           # the gpu preset keeps an EMA for every method
    assert rec["config"]["mu"] == 7 and rec["config"]["ema_decay"] == 0.999
