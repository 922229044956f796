"""Precision: float32 against bf16 autocast (with channels_last), and what FitConfig(precision="auto") picks here.

Run: .venv/bin/python bench/precision.py                 (throughput only: images/s of a training step, one run)
     .venv/bin/python bench/precision.py --accuracy      (also: supervised and FixMatch, 3 seeds, each precision that
                                                           differs here, cpu preset; records go to nbs/results/cpu)
     .venv/bin/python bench/precision.py --accuracy --preset tiny   (the same on the embedded digits)
     ... --methods supervised                               (only some methods)

Throughput: forward, backward and SGD step of the preset model on a batch of 320 CIFAR-sized images (the size of a
FixMatch step of the cpu preset: 64 labeled + 2 x 128 unlabeled), fastest of 5 timed steps after 2 warm-up steps.
Augmentation is left out: it always runs in float32.
"""
import argparse, time
from dataclasses import replace

import torch
import torch.nn.functional as F

from common import machine
from ssl_book.models import build_model
from ssl_book.train import cpu_has_bf16, resolve_precision

def images_per_second(model_name: str, precision: str, batch: int, steps: int = 5, **kw) -> float:
    torch.manual_seed(0)
    model = build_model(model_name, **kw)
    amp = precision == "bf16"
    if amp: model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    for _ in range(2): step()
    times = []
    for _ in range(steps):
        t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    return batch / min(times)

def throughput():
    auto = resolve_precision("auto", "cpu")
    print(f"machine: {machine()}; bf16 instructions (AMX-BF16 / AVX512-BF16): {cpu_has_bf16()}; auto -> {auto}")
    print(f"{'model':<26} {'batch':>5} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16 / fp32':>11} {'auto':>6}")
    for name, kw, batch, steps in (("cnn", {"width": 32}, 320, 5), ("wrn28_2", {}, 64, 3)):
        f32 = images_per_second(name, "fp32", batch, steps, **kw)
        b16 = images_per_second(name, "bf16", batch, steps, **kw)
        label = f"{name} {kw or ''}".strip()
        print(f"{label:<26} {batch:>5} {f32:>11,.0f} {b16:>11,.0f} {b16 / f32:>10.2f}x {auto:>6}")

def accuracy(preset_name: str, seeds, methods):
    from ssl_book.experiment import run_experiment
    from ssl_book.presets import get_preset
    from ssl_book.results import format_table, summarize
    preset = get_preset(preset_name)
    auto = resolve_precision("auto", "cpu")
    # "auto" is its own run only where it means bf16; elsewhere it is the fp32 run again, so compare fp32 with bf16
    other = "auto" if auto == "bf16" else "bf16"
    precisions = ["fp32", other]
    if auto == "fp32" and preset_name != "tiny":
        print(f"\nauto means fp32 on this machine, and emulated bf16 is several times slower than fp32 (above): the "
              f"{preset_name}-preset comparison needs a machine with bf16 hardware. Running fp32 only.")
        precisions = ["fp32"]
    for precision in precisions:
        p = replace(preset, fit=replace(preset.fit, precision=precision))
        t = time.time()
        recs = run_experiment(p, methods, seeds=seeds, store="nbs/results", device="cpu")
        print(f"\nprecision={precision} (runs as {resolve_precision(precision, 'cpu')}); {p.describe()}; "
              f"{recs[0]['data']}; {(time.time() - t) / 60:.1f} min wall")
        print(format_table(summarize(recs)))

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["supervised", "fixmatch"])
    a = ap.parse_args()
    throughput()
    if a.accuracy: accuracy(a.preset, a.seeds, a.methods)
