"Shared helpers for the benchmarks: data to run on and a timer."
import time
import torch
from ssl_book.data import load_dataset, make_synthetic
from ssl_book.results import machine as results_machine

def cifar_or_synthetic(n: int):
    "n CIFAR-10 training images if a local copy is found (no download), else synthetic 32x32 images."
    try:
        train, _ = load_dataset("cifar10", download=False)
        return train.subset(range(n)), "CIFAR-10 (JPEG mirror)"
    except ValueError:
        return make_synthetic(n_per_class=n // 10 + 1, n_classes=10, size=32).subset(range(n)), "synthetic 32x32"

def best_of(fn, repeats: int = 5) -> float:
    "The fastest of `repeats` timed calls, in seconds (after one warm-up call)."
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)

def machine() -> str:
    "CPU model, thread count and torch version, as one line (from the results records' `machine`)."
    m = results_machine()
    return f"{m['gpu'] or m['cpu']}, {m['threads']} torch threads, torch {m['torch']}"
