"Shared fixtures: small data sets that the tests make themselves, and the project root."
import os
from pathlib import Path
import pytest
import torch

from ssl_book.data import load_dataset, make_synthetic

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="session")
def digits():
    "The embedded digits, (train, test)."
    return load_dataset("digits")

@pytest.fixture
def synthetic():
    return make_synthetic(n_per_class=30, n_classes=4, size=8)

@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    "Caches that the tests write go to a temporary folder, not to the user's ~/.cache."
    import ssl_book.data as data_module
    old, data_module.CACHE_DIR = data_module.CACHE_DIR, tmp_path_factory.mktemp("cache")
    yield
    data_module.CACHE_DIR = old

@pytest.fixture(autouse=True)
def _threads():
    # `make test` runs two pytest workers with one thread each (OMP_NUM_THREADS=1); alone, use two
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))

def train_registered_on_tiny(digits, names, seeds=(0, 1, 2)) -> dict:
    "Histories of registered methods on the tiny preset, keyed (name, seed); every method of a seed shares its split."
    from dataclasses import replace
    from ssl_book.data import split
    from ssl_book.experiment import available_methods, make_model
    from ssl_book.presets import get_preset
    from ssl_book.train import METHODS, fit
    available_methods()
    train, test = digits
    preset = get_preset("tiny")
    out = {}
    for seed in seeds:
        s = split(train.labels, preset.n_labeled, preset.n_unlabeled, preset.n_val, seed=seed)
        for name in names:
            method = METHODS[name](make_model(preset, train, seed), preset)
            out[name, seed] = fit(method, train, s, replace(preset.fit, seed=seed), test, progress=False, device="cpu")
    return out
