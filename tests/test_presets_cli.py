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
    assert default_preset_name() == "cpu"          # with or without CUDA: gpu's hours are an explicit choice
    p = get_preset("cpu"); p.fit.steps = 1
    assert get_preset("cpu").fit.steps != 1                              # a copy, not the shared preset

def test_unknown_preset(monkeypatch):
    with pytest.raises(ValueError, match="tiny, cpu, gpu"):
        get_preset("huge")

def test_summary_mean_and_std():
    rows = summarize([{"method": "m", "labels": 10, "test_acc": a, "test_acc_ema": a, "test_acc_raw": a - 0.1,
                       "minutes": 1.0} for a in (0.5, 0.7)])
    assert rows[0]["acc_mean"] == pytest.approx(60.0) and rows[0]["acc_std"] == pytest.approx(14.1421356)
    assert rows[0]["raw_mean"] == pytest.approx(50.0)
    assert "60.00 ± 14.14" in format_table(rows) and "50.00 ± 14.14" in format_table(rows)

def test_bench_prints_table_and_writes_files(tmp_path, capsys):
    rc = main(["bench", "--preset", "tiny", "--methods", "supervised", "--seeds", "0", "1", "--labels", "30",
               "--steps", "40", "--out", str(tmp_path)])
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
    rc = main(["bench", "--preset", "tiny", "--methods", "supervised", "--data", "folder", "--root", str(tmp_path / "data"), "--labels", "4",
               "--steps", "5", "--out", str(tmp_path / "out")])
    assert rc == 0 and "supervised" in capsys.readouterr().out


def test_bench_runs_every_registered_method_and_recipe_by_default(tmp_path, capsys):
    "The main job (`make demo`): every method and recipe on the same split, a table and a chart."
    rc = main(["bench", "--preset", "tiny", "--steps", "6", "--out", str(tmp_path), "--store", str(tmp_path / "store")])
    out = capsys.readouterr().out
    names = available_methods()
    assert rc == 0 and "teacher_student" in names and len(names) >= 10
    table = out[out.index("method "):]
    assert all(f"\n{n} " in table for n in names) and table.index("supervised") < table.index("fixmatch")
    res = json.loads((tmp_path / "results.json").read_text())
    assert len({r["split"] for r in res["runs"]}) == 1                       # one split for all
    assert len(list((tmp_path / "store" / "tiny").glob("*.json"))) == len(names)
    assert (tmp_path / "results.png").stat().st_size > 1000

def _cost_record(method, precision, interval_s, seed):
    hist = [{"step": 50 * (i + 1), "time_s": sum(interval_s[: i + 1])} for i in range(len(interval_s))]
    return {"run_id": f"{method}{precision}{seed}", "preset": "tiny", "method": method, "labels": 50, "seed": seed,
            "test_acc": 0.9, "test_acc_raw": 0.9, "minutes": sum(interval_s) / 60, "precision": precision,
            "machine": {"cpu": "Test CPU", "gpu": None, "threads": 2}, "history": hist, "steps": 300, "model": "cnn"}

def test_preset_costs_reads_the_store_and_ignores_a_paused_interval(tmp_path):
    from ssl_book.presets import preset_costs
    from ssl_book.results import save_record
    assert "no results store" in preset_costs(tmp_path)
    save_record(_cost_record("supervised", "fp32", [6, 6, 6, 600, 6, 6], 0), tmp_path)   # paused once for 10 minutes
    save_record(_cost_record("fixmatch", "fp32", [12] * 6, 0), tmp_path)
    save_record(_cost_record("fixmatch", "fp32", [18] * 6, 1), tmp_path)
    save_record({**_cost_record("fixmatch", "fp32", [99] * 6, 2), "steps": 20}, tmp_path)    # --steps 20: not the preset
    table = preset_costs(tmp_path).splitlines()
    tiny = next(l for l in table if l.startswith("tiny"))
    # supervised at its median pace, 6 intervals x 6 s = 0.6 min (not 10.5); SSL: the median of 1.2 and 1.8 min
    assert "0.6 min (1)" in tiny and "1.5 min (2)" in tiny and "fp32" in tiny and "Test CPU" in tiny
    assert all("not measured" in l for l in table if l.startswith(("cpu", "gpu")))

def test_student_command_releases_a_folder_with_a_manifest(tmp_path, capsys):
    from ssl_book.cli import main
    from conftest import ROOT
    assert main(["student", str(ROOT / "nbs"), "-o", str(tmp_path / "release")]) == 0
    out = capsys.readouterr().out
    n = len(list((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")))
    assert f"released {n} chapters" in out and (tmp_path / "release" / "manifest.csv").exists()
    assert main(["student", str(ROOT / "nbs" / "toolkit"), "-o", str(tmp_path / "r2")]) == 2   # no exercises there
    assert "nothing to release" in capsys.readouterr().err

def test_choose_preset_follows_the_line_unless_the_environment_chose(monkeypatch):
    import ssl_book.presets as P
    monkeypatch.setattr(P, "_PRESET_AT_IMPORT", None)             # nothing set outside the notebook
    monkeypatch.setenv("SSL_BOOK_PRESET", "cpu")
    assert P.choose_preset("gpu") == "gpu" and P.default_preset_name() == "gpu"
    assert P.choose_preset("tiny") == "tiny"                       # the line edited and run again
    monkeypatch.setattr(P, "_PRESET_AT_IMPORT", "tiny")            # the tests' SSL_BOOK_PRESET=tiny wins
    assert P.choose_preset("gpu") == "tiny" and P.default_preset_name() == "tiny"
    with pytest.raises(ValueError, match="unknown preset"):
        P.choose_preset("huge")

def test_bench_robustness_evaluates_and_stores_every_run(tmp_path, capsys):
    "--robustness: Chapter 9's evaluation of each run, Noisy Student by round, stored and read back the second time."
    args = ["bench", "--preset", "tiny", "--methods", "supervised", "noisy_student", "--steps", "30", "--store",
            str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--robustness", "--corruptions", "gaussian_noise",
            "contrast"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "robustness: 2 corruptions x 5 severities, corrupted on the fly" in out
    assert all(f"noisy_student_round{i}" in out for i in range(3)) and "\nsupervised " in out
    stored = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
              for p in (tmp_path / "store" / "tiny" / "robustness").glob("*.json")}
    assert sorted(stored) == ["noisy_student_round0", "noisy_student_round1", "noisy_student_round2", "supervised"]
    assert [stored[f"noisy_student_round{i}"]["stage"] for i in range(3)] == [0, 1, 2]
    run = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (tmp_path / "store" / "tiny").glob("*.json")}
    # the models just trained were kept (a temporary checkpoint folder) and evaluated: clean accuracy is the run's own
    assert stored["supervised"]["clean_acc"] == pytest.approx(run["supervised"]["test_acc"], abs=1e-6)
    for i in range(3):                                      # every round is its own stage's model (the last: the run's)
        stage_acc = [row for row in run["noisy_student"]["stage_histories"][i] if "test_acc" in row][-1]["test_acc"]
        assert stored[f"noisy_student_round{i}"]["clean_acc"] == pytest.approx(stage_acc, abs=1e-6), i
    assert stored["noisy_student_round2"]["clean_acc"] == pytest.approx(run["noisy_student"]["test_acc"], abs=1e-6)
    files = sorted((tmp_path / "store" / "tiny" / "robustness").glob("*.json"))
    before = [p.read_text() for p in files]
    assert main(args) == 0                                   # the second time: read from the store, nothing rewritten
    assert [p.read_text() for p in files] == before
    assert main(args[:-2] + ["gaussian_noise"]) == 0         # fewer corruptions: served by the stored, fuller records
    assert [p.read_text() for p in files] == before
    assert main(["bench", "--preset", "tiny", "--methods", "supervised", "--robustness", "--corruptions", "fog_typo",
                 "--out", str(tmp_path / "out")]) == 2
    assert "fog_typo" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--corruptions", "fog", "--out", str(tmp_path / "out")]) == 2
    assert "--corruptions goes with --robustness" in capsys.readouterr().err

def test_cifar10c_folder_is_written_once_per_test_set(tmp_path):
    from ssl_book.corruptions import cifar10c_folder, load_cifar10c
    from ssl_book.data import load_dataset, make_synthetic
    small = make_synthetic(n_per_class=3, n_classes=2, size=32, seed=0)
    a = cifar10c_folder(small, ["gaussian_noise", "contrast"], root=tmp_path)
    assert cifar10c_folder(small, ["gaussian_noise", "contrast"], root=tmp_path) == a
    x, y = load_cifar10c(a, "contrast", 5)
    assert x.shape == (6, 32, 32, 3) and (y == small.labels.numpy()).all()
    other = make_synthetic(n_per_class=3, n_classes=2, size=32, seed=1)
    assert cifar10c_folder(other, ["contrast"], root=tmp_path) != a                  # another test set, another folder
    with pytest.raises(ValueError, match="32 x 32 RGB"):
        cifar10c_folder(load_dataset("digits")[1], ["contrast"], root=tmp_path)
