"Chapter 9, second half: the robustness evaluation against direct computations, its metrics, and a tiny end-to-end run."
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ssl_book.corruptions import (ALL_CORRUPTIONS, CORRUPTIONS, SEVERITIES, AtSize, benchmark_images, evaluate_robustness,
                                  evaluate_run, fast_inference, mce, relative_mce, robustness_metrics, robustness_path,
                                  robustness_record, stage_runs)
from ssl_book.data import ImageSet, load_dataset, split
from ssl_book.evaluate import accuracy
from ssl_book.experiment import make_model, run_experiment, trained_model
from ssl_book.models import small_cnn
from ssl_book.presets import get_preset
from ssl_book.results import load_records
from ssl_book.train import Supervised, fit


class Brightness(nn.Module):
    "Class 1 exactly when an image's mean is above mid-grey."
    def __init__(self):
        super().__init__(); self.unused = nn.Linear(1, 1)
    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1)

def _known_folder(folder: Path, n: int = 40):
    "A CIFAR-10-C folder of black and white images where severity s of a corruption darkens k(s) bright images."
    x0 = np.zeros((n, 32, 32, 3), np.uint8); x0[n // 2:] = 255
    y0 = (np.arange(n) >= n // 2).astype(np.int64)
    known = {}
    for name, k in [("fog", lambda s: 3 * s), ("pixelate", lambda s: s - 1)]:
        blocks = []
        for s in SEVERITIES:
            x = x0.copy(); x[n // 2:n // 2 + k(s)] = 0
            blocks.append(x); known[name] = known.get(name, []) + [1 - k(s) / n]
        np.save(folder / f"{name}.npy", np.concatenate(blocks))
    np.save(folder / "labels.npy", np.tile(y0.astype(np.uint8), 5))
    return ImageSet(torch.from_numpy(x0).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y0), ["dark", "bright"]), known

def test_evaluation_matches_a_direct_computation_on_a_known_folder(tmp_path):
    clean, known = _known_folder(tmp_path)
    res = evaluate_robustness(Brightness(), clean, data=tmp_path, corruptions=["fog", "pixelate"])
    assert res["clean_acc"] == 1.0 and res["severities"] == list(SEVERITIES) and res["n_images"] == 40
    for name, accs in known.items():
        assert np.allclose(res["acc"][name], accs)
    m = robustness_metrics(res)
    assert m["n_benchmark"] == 2 and m["mce"] == pytest.approx(np.mean([1 - np.array(a) for a in known.values()]))
    assert m["sev5_acc"] == pytest.approx(np.mean([a[4] for a in known.values()])) and m["extra_error"] is None

def test_metrics_agree_with_mce_and_relative_mce_on_the_full_benchmark():
    rng = np.random.default_rng(0)
    res = {"clean_acc": 0.9, "severities": list(SEVERITIES), "acc": {c: list(rng.uniform(0.3, 0.85, 5)) for c in ALL_CORRUPTIONS}}
    base = {"clean_acc": 0.8, "severities": list(SEVERITIES), "acc": {c: list(rng.uniform(0.2, 0.75, 5)) for c in ALL_CORRUPTIONS}}
    err = lambda r: {c: 1 - np.array(r["acc"][c]) for c in CORRUPTIONS}
    m = robustness_metrics(res, base)
    assert m["mce"] == pytest.approx(mce(err(res)), abs=1e-12)
    assert m["relative_mce"] == pytest.approx(relative_mce(err(res), 0.1, err(base), 0.2), abs=1e-12)
    assert m["n_benchmark"] == 15 and m["n_sev5"] == 19 and len(m["extra"]) == 4
    assert m["extra_error"] == pytest.approx(np.mean([1 - np.array(res["acc"][c]) for c in m["extra"]]))
    assert robustness_metrics(res, res)["relative_mce"] == pytest.approx(1.0)

@pytest.mark.parametrize("bad, msg", [
    ({"clean_acc": 0.5}, "evaluate_robustness"),
    ({"clean_acc": 0.5, "severities": [1, 2, 3, 4, 5], "acc": {"fog": [0.5, 1.2, 0.3, 0.2, 0.1]}}, r"\[0, 1\]"),
    ({"clean_acc": 0.5, "severities": [1, 2, 3, 4, 5], "acc": {"fog": [0.5, 0.4]}}, "5 accuracies"),
    ({"clean_acc": 1.5, "severities": [1, 2, 3, 4, 5], "acc": {"fog": [0.5] * 5}}, "clean_acc")])
def test_metrics_refuse_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg): robustness_metrics(bad)

def test_base_must_share_corruptions_and_severities():
    a = {"clean_acc": 0.9, "severities": [1, 2, 3, 4, 5], "acc": {"fog": [0.8] * 5}}
    with pytest.raises(ValueError, match="base"): robustness_metrics(a, {"clean_acc": 0.9, "severities": [1, 2, 3, 4, 5], "acc": {"snow": [0.7] * 5}})
    with pytest.raises(ValueError, match="clean error"): robustness_metrics(a, {"clean_acc": 0.8, "severities": [1, 2, 3, 4, 5], "acc": {"fog": [0.8] * 5}})

def test_benchmark_images_and_at_size_round_trip_the_digits_exactly():
    _, test = load_dataset("digits")
    x = test.images[:20]
    big = benchmark_images(x)
    assert big.shape == (20, 32, 32, 3) and big.dtype == np.uint8
    model = small_cnn(1, 10, 8).eval()
    with torch.no_grad():
        direct = model(x.float() / 255)
        wrapped = AtSize(model, 8, 1)(torch.from_numpy(big).permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(direct, wrapped, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"): benchmark_images(x.float())
    with pytest.raises(ValueError, match="dividing 32"): benchmark_images(torch.zeros(2, 1, 7, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"): AtSize(model, 8, 2)
    assert not AtSize(model, 8, 1).training                                # the wrapper starts in the model's mode
    assert AtSize(small_cnn(1, 10, 8).train(), 8, 1).training

def test_fast_inference_folds_batchnorm_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = small_cnn(1, 10, 8)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics far from the identity
        bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2); bn.weight.data.uniform_(0.5, 2); bn.bias.data.uniform_(-1, 1)
    net = AtSize(model, 8, 1).eval()
    fast = fast_inference(net)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in fast.modules())   # traced and folded
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in model.modules())   # a copy: the model keeps its layers
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-4)
        assert not torch.allclose(fast(x), AtSize(small_cnn(1, 10, 8), 8, 1).eval()(x), atol=1e-2)   # the check can fail

def test_tiny_end_to_end_on_digits_with_two_corruptions(tmp_path):
    preset = get_preset("tiny")
    train, test = load_dataset("digits")
    runs = run_experiment(preset, ["supervised"], seeds=[0], data=(train, test), store=tmp_path, checkpoint_dir=tmp_path / "ck")
    s = split(train.labels, preset.n_labeled, preset.n_unlabeled, preset.n_val, seed=0)
    m = Supervised(make_model(preset, train, 0))
    fit(m, train, s, replace(preset.fit, seed=0), test, progress=False, device="cpu")
    model = m.ema_model
    calls = []
    def restore():                                          # the model, lazily: only when the evaluation is not stored
        calls.append(1)
        return trained_model(preset, runs[0], train, test, checkpoint_dir=tmp_path / "ck")
    rec = evaluate_run(runs[0], restore, test, tmp_path, corruptions=["gaussian_noise", "contrast"])
    assert calls == [1]
    assert rec["kind"] == "robustness" and list(rec["acc"]) == ["gaussian_noise", "contrast"]
    assert rec["clean_acc"] == pytest.approx(accuracy(model, test)) == pytest.approx(runs[0]["test_acc"])
    assert rec["acc"]["gaussian_noise"][4] < rec["clean_acc"]            # the strongest noise costs accuracy
    assert all(0 <= a <= 1 for v in rec["acc"].values() for a in v)
    # stored beside the run, read back on the second call, and not mistaken for a training record
    again = evaluate_run(runs[0], None, test, tmp_path, corruptions=["gaussian_noise", "contrast"])
    assert again == json.loads(json.dumps(rec))
    assert evaluate_run(runs[0], restore, test, tmp_path, corruptions=["gaussian_noise", "contrast"]) == again
    assert calls == [1]                                      # stored: the model was not restored again
    assert [r["method"] for r in load_records(tmp_path, "tiny")] == ["supervised"]
    metrics = robustness_metrics(rec, rec)
    assert metrics["relative_mce"] == pytest.approx(1.0) and metrics["n_benchmark"] == 2
    with pytest.raises(ValueError, match="nn.Module or a function"):       # a Method, say, instead of its model
        evaluate_run(runs[0], object(), test, tmp_path, corruptions=["gaussian_noise"], seed=2)
    with pytest.raises(ValueError, match="not an nn.Module"):
        evaluate_run(runs[0], lambda: m, test, tmp_path, corruptions=["gaussian_noise"], seed=2)
    # another corruption seed is another evaluation: not read from the store, and without a model it is an error
    with pytest.raises(ValueError, match="no stored evaluation"):
        evaluate_run(runs[0], None, test, tmp_path, corruptions=["gaussian_noise", "contrast"], seed=1)

def test_the_record_keeps_the_run_seed_and_data():
    run = {"preset": "cpu", "data": "CIFAR-10 (JPEG mirror)", "method": "fixmatch", "labels": 1000, "unlabeled": 20000,
           "seed": 2, "split": "abc", "run_id": "r1", "precision": "bf16", "test_acc": 0.6, "test_acc_raw": 0.61}
    result = {"clean_acc": 0.6, "acc": {"fog": [0.5] * 5}, "severities": [1, 2, 3, 4, 5], "n_images": 10,
              "corruption_seed": 0, "source": "folder", "amp": False, "fast": True}
    rec = robustness_record(run, result)
    assert rec["seed"] == 2 and rec["data"] == "CIFAR-10 (JPEG mirror)" and rec["corruption_seed"] == 0 and rec["kind"] == "robustness"
    with pytest.raises(ValueError, match="run's own fields"): robustness_record(run, {**result, "seed": 0})

def test_every_round_of_noisy_student_is_a_model_of_its_own(tmp_path):
    "stage_runs and trained_model(stage=i): each round's model gives the accuracy its stage reported (the oracle)."
    preset = get_preset("tiny")
    small = replace(preset, fit=replace(preset.fit, steps=30, eval_every=10))
    train, test = load_dataset("digits")
    run = run_experiment(small, ["noisy_student"], seeds=[0], data=(train, test), store=tmp_path,
                         checkpoint_dir=tmp_path / "ck")[0]
    rounds = stage_runs(run)
    assert [r["method"] for r in rounds] == [f"noisy_student_round{i}" for i in range(3)]
    assert [r["stage_name"] for r in rounds] == ["teacher", "student 1 (x1)", "student 2 (x1.5)"]
    assert rounds[-1]["test_acc"] == run["test_acc"] and rounds[0]["run_id"] == run["run_id"]
    for r in rounds:
        model = trained_model(small, run, train, test, checkpoint_dir=tmp_path / "ck", stage=r["stage"])
        assert accuracy(model, test) == pytest.approx(r["test_acc"], abs=1e-6)
    assert len({str(robustness_path(r, tmp_path)) for r in rounds}) == 3          # three records, side by side
    with pytest.raises(ValueError, match="not a recipe run"):
        stage_runs({"method": "supervised", "stage_histories": None})
    with pytest.raises(ValueError, match="stage must be in"):
        trained_model(small, run, train, test, checkpoint_dir=tmp_path / "ck", stage=3)
    sup = run_experiment(small, ["supervised"], seeds=[0], data=(train, test), checkpoint_dir=tmp_path / "ck")[0]
    with pytest.raises(ValueError, match="a single stage"):
        trained_model(small, sup, train, test, checkpoint_dir=tmp_path / "ck", stage=1)

def test_clean_accuracy_goes_through_the_same_network_as_the_corrupted_images(monkeypatch):
    "evaluate_robustness scores the clean images with the very (folded) network that sees the corrupted ones."
    import ssl_book.corruptions as C
    _, test = load_dataset("digits")
    test = test.subset(range(60))
    class Always(nn.Module):                                 # whatever it is given, class k
        def __init__(self, k): super().__init__(); self.k, self.w = k, nn.Linear(1, 1)
        def forward(self, x): return torch.nn.functional.one_hot(torch.full((len(x),), self.k), 10).float()
    monkeypatch.setattr(C, "fast_inference", lambda net: Always(0))            # the "folded" network says 0
    r = C.evaluate_robustness(Always(1), test, corruptions=["contrast"])        # the model as given says 1
    share = float((test.labels == 0).float().mean())
    assert r["clean_acc"] == pytest.approx(share) and r["acc"]["contrast"] == pytest.approx([share] * 5)

def test_evaluate_runs_names_a_model_it_would_have_to_train(tmp_path):
    "train_missing=False: no stored evaluation and no checkpoint is an error naming the run, not a training run."
    from ssl_book.corruptions import evaluate_runs
    from ssl_book.experiment import run_experiment
    import ssl_book.experiment as E
    preset = get_preset("tiny")
    preset = replace(preset, fit=replace(preset.fit, steps=5, eval_every=5))
    train, test = load_dataset("digits")
    runs = run_experiment(preset, ["supervised"], data=(train, test), store=tmp_path / "store", checkpoint_dir=tmp_path / "ck")
    orig, E.fit = E.fit, None                                  # any training would fail
    try:
        with pytest.raises(ValueError, match=r"supervised \(50 labels, seed 0\) has no stored evaluation and no checkpoints"):
            evaluate_runs(preset, runs, train, test, tmp_path / "store", tmp_path / "elsewhere", train_missing=False,
                          corruptions=["contrast"])
    finally: E.fit = orig
    e, = evaluate_runs(preset, runs, train, test, tmp_path / "store", tmp_path / "ck", train_missing=False, corruptions=["contrast"])
    assert e["clean_acc"] == pytest.approx(runs[0]["test_acc"], abs=1e-6)        # restored from its checkpoint
