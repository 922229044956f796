"`fit` under torchrun: 2 processes on the CPU (gloo) reproduce one process with the same global batch."
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent

def _run(tmp_path, name: str, kind: str, nproc: int | None) -> dict:
    out = tmp_path / f"{name}.json"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (torchrun if nproc else [sys.executable]) + [str(HERE / "ddp_fit.py"), str(out), kind]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Exception ignored in atexit" not in r.stderr, r.stderr[-3000:]    # an exit handler's error is only printed
    return json.loads(out.read_text())

@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    one, two = _run(tmp_path, "one", "mlp", None), _run(tmp_path, "two", "mlp", 2)
    assert one["world"] == 1 and two["world"] == 2 and len(one["loss"]) == len(two["loss"]) == 30
    assert np.allclose(one["loss"], two["loss"], rtol=0, atol=1e-5), np.abs(np.subtract(one["loss"], two["loss"])).max()
    assert one["loss"][-1] < 0.5 * one["loss"][0]                                   # and it did learn
    assert [(tmp_path / f"two.json.left{r}").read_text() for r in (0, 1)] == ["True", "True"]   # left by hand

@pytest.mark.slow
def test_fixmatch_with_batchnorm_runs_under_torchrun_and_process_0_checkpoints(tmp_path):
    two = _run(tmp_path, "cnn", "cnn", 2)
    assert two["world"] == 2 and len(two["loss"]) == 2 and all(0 <= a <= 1 for a in two["test_acc"])
    assert (tmp_path / "cnn.json.pt").exists()
    # nobody called destroy_process_group: distributed() left the group at exit, in both processes
    assert [(tmp_path / f"cnn.json.left{r}").read_text() for r in (0, 1)] == ["True", "True"]

def test_batch_must_split_evenly(monkeypatch):
    import torch
    from ssl_book.data import make_synthetic, split
    from ssl_book.models import small_cnn
    from ssl_book.train import FitConfig, Supervised, fit
    import ssl_book.train as train_module
    monkeypatch.setattr(train_module, "distributed", lambda: (0, 2))
    data = make_synthetic(n_per_class=8, n_classes=2, size=8)
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        fit(Supervised(small_cnn(3, 2, 8)), data, split(data.labels, 4), FitConfig(steps=1, batch_size=5), progress=False)
