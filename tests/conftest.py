"Shared fixtures: small data sets that the tests make themselves, and the project root."
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

@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
