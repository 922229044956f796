"Presets, the experiment runner and the ssl-book command."
import json
import subprocess, sys
from pathlib import Path

import pytest

from ssl_book.cli import main
from ssl_book.experiment import available_methods, format_table, summarize
from ssl_book.presets import PRESETS, default_preset_name, get_preset

def test_presets_and_env(monkeypatch):
    assert set(PRESETS) == {"tiny", "cpu", "gpu"}
    monkeypatch.setenv("SSL_BOOK_PRESET", "tiny")
    assert default_preset_name() == "tiny" and get_preset().data == "digits"
    monkeypatch.delenv("SSL_BOOK_PRESET")
    assert default_preset_name() in ("cpu", "gpu")
    p = get_preset("cpu"); p.fit.steps = 1
    assert get_preset("cpu").fit.steps != 1                              # a copy, not the shared preset

def test_unknown_preset(monkeypatch):
    with pytest.raises(ValueError, match="tiny, cpu, gpu"):
        get_preset("huge")

def test_summary_mean_and_std():
    rows = summarize([{"method": "m", "labels": 10, "test_acc": a, "minutes": 1.0} for a in (0.5, 0.7)])
    assert rows[0]["acc_mean"] == pytest.approx(60.0) and rows[0]["acc_std"] == pytest.approx(14.1421356)
    assert "60.00 ± 14.14" in format_table(rows)

def test_bench_prints_table_and_writes_files(tmp_path, capsys):
    rc = main(["bench", "--preset", "tiny", "--seeds", "0", "1", "--labels", "30", "--steps", "40",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "supervised" in out and "±" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["summary"][0]["labels"] == 30 and res["summary"][0]["seeds"] == 2
    assert len(res["runs"]) == 2 and res["preset"]["name"] == "tiny"
    assert (tmp_path / "results.png").stat().st_size > 1000

def test_bench_unknown_method_is_a_clear_error(capsys):
    assert main(["bench", "--preset", "tiny", "--methods", "magic"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err

def test_registered_methods_include_supervised():
    assert "supervised" in available_methods()

def test_installed_console_script():
    exe = Path(sys.executable).with_name("ssl-book")
    assert exe.exists(), "the ssl-book console script is not installed next to this Python"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "bench" in r.stdout and "student" in r.stdout
    r = subprocess.run([str(exe), "bench", "--preset", "tiny", "--steps", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "steps" in r.stderr                       # a clear error, not a traceback

def test_bench_on_an_image_folder(tmp_path, capsys):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    rc = main(["bench", "--preset", "tiny", "--data", "folder", "--root", str(tmp_path / "data"), "--labels", "4",
               "--steps", "5", "--out", str(tmp_path / "out")])
    assert rc == 0 and "supervised" in capsys.readouterr().out
