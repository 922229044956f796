"ssl_book.train: determinism, checkpoint and resume, EMA, schedule, errors, and that training learns."
import math
import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from ssl_book.data import split
from ssl_book.experiment import make_model
from ssl_book.presets import get_preset
from ssl_book.train import (FitConfig, Method, NonFiniteLossError, Supervised, ema_update, fit, load_checkpoint,
                            lr_factor, save_checkpoint)

CFG = FitConfig(steps=24, batch_size=16, lr=0.05, eval_every=8, flip=False)

def _setup(digits, seed=0, dropout=0.0):
    train, test = digits
    s = split(train.labels, 50, seed=seed)
    torch.manual_seed(seed)
    from ssl_book.models import small_cnn
    return small_cnn(in_channels=1, width=8, dropout=dropout), train, test, s

def test_same_seed_same_weights(digits):
    runs = []
    for _ in range(2):
        m, train, test, s = _setup(digits, dropout=0.3)
        fit(Supervised(m), train, s, CFG, progress=False, device="cpu")
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])

def test_different_seed_different_weights(digits):
    m1, train, test, s = _setup(digits)
    m2 = _setup(digits)[0]
    fit(Supervised(m1), train, s, CFG, progress=False, device="cpu")
    fit(Supervised(m2), train, s, replace(CFG, seed=1), progress=False, device="cpu")
    assert not torch.equal(m1.state_dict()["head.weight"], m2.state_dict()["head.weight"])

class _Crash(Supervised):
    "Dies at a given step, like a Colab session that disconnects."
    def __init__(self, model, at): super().__init__(model); self._at = at     # private: not one of its settings
    def training_step(self, batch):
        if batch.step == self._at: raise KeyboardInterrupt
        return super().training_step(batch)

@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_interruption_is_bit_exact(digits, tmp_path, ema):
    cfg = replace(CFG, ema_decay=ema, mu=0)
    ref, train, test, s = _setup(digits, dropout=0.3)
    h_ref = fit(Supervised(ref), train, s, cfg, test, progress=False, device="cpu")

    m, *_ = _setup(digits, dropout=0.3)
    ck = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(_Crash(m, at=13), train, s, cfg, test, checkpoint=ck, progress=False, device="cpu")
    assert load_checkpoint(ck)["step"] == 8                               # the last checkpoint before the crash
    m2, *_ = _setup(digits, dropout=0.3)                                  # a fresh process: new model object
    meth = Supervised(m2)
    h = fit(meth, train, s, cfg, test, checkpoint=ck, progress=False, device="cpu")
    assert all(torch.equal(ref.state_dict()[k], m2.state_dict()[k]) for k in ref.state_dict())
    assert [r["test_acc"] for r in h.rows] == [r["test_acc"] for r in h_ref.rows]
    assert [r["step"] for r in h.rows] == [8, 16, 24]

def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"step": 1, "w": torch.ones(2)})
    save_checkpoint(p, {"step": 2, "w": torch.zeros(2)})
    assert load_checkpoint(p)["step"] == 2 and not list(tmp_path.glob("*.tmp"))
    torch.save({"obj": nn.Linear(1, 1)}, tmp_path / "unsafe.pt")          # a pickled module
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_checkpoint(tmp_path / "unsafe.pt")                           # refused by weights_only=True

def test_resume_with_other_config_is_refused(digits, tmp_path):
    m, train, test, s = _setup(digits)
    ck = tmp_path / "c.pt"
    fit(Supervised(m), train, s, replace(CFG, steps=8), checkpoint=ck, progress=False, device="cpu")
    with pytest.raises(ValueError, match="another run"):
        fit(Supervised(m), train, s, replace(CFG, lr=0.1), checkpoint=ck, progress=False, device="cpu")
    with pytest.raises(ValueError, match="another run"):                 # same config, another split
        fit(Supervised(m), train, split(train.labels, 50, seed=1), replace(CFG, steps=8), checkpoint=ck,
            progress=False, device="cpu")

class _WithUnlabeled(Supervised):
    "Uses the unlabeled batch (a mean-prediction penalty), so resume must also restore the unlabeled stream."
    name = "with-unlabeled"
    uses_unlabeled = True
    def training_step(self, batch):
        loss, logs = super().training_step(batch)
        p = self.model(batch.aug.strong(batch.u)).softmax(1)
        return loss + 0.1 * (p.mean(0) ** 2).sum(), {**logs, "n_u": float(len(batch.u))}

def test_resume_with_unlabeled_stream_is_bit_exact(digits, tmp_path):
    cfg = replace(CFG, mu=2)
    ref, train, test, s = _setup(digits, dropout=0.3)
    fit(_WithUnlabeled(ref), train, s, cfg, progress=False, device="cpu")
    m, *_ = _setup(digits, dropout=0.3)
    class Crash(_WithUnlabeled):
        def training_step(self, batch):
            if batch.step == 19: raise KeyboardInterrupt
            return super().training_step(batch)
    with pytest.raises(KeyboardInterrupt):
        fit(Crash(m), train, s, cfg, checkpoint=tmp_path / "c.pt", progress=False, device="cpu")
    m2, *_ = _setup(digits, dropout=0.3)
    h = fit(_WithUnlabeled(m2), train, s, cfg, checkpoint=tmp_path / "c.pt", progress=False, device="cpu")
    assert all(torch.equal(ref.state_dict()[k], m2.state_dict()[k]) for k in ref.state_dict())
    assert h.final["n_u"] == 2 * cfg.batch_size                           # a Python float log is accepted

def test_fit_rejects_mismatched_split_and_model(digits):
    m, train, test, s = _setup(digits)
    from ssl_book.data import Split
    bad = Split(torch.tensor([0, 5000]), torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..1346"):
        fit(Supervised(m), train, bad, CFG, progress=False, device="cpu")
    from ssl_book.models import small_cnn
    with pytest.raises(ValueError, match="predicts 3 classes but the data have 10"):
        fit(Supervised(small_cnn(in_channels=1, width=4, n_classes=3)), train, s, CFG, progress=False, device="cpu")

def test_nan_loss_names_step_and_lr(digits):
    class NaNAt3(Supervised):
        def training_step(self, batch):
            loss, logs = super().training_step(batch)
            return (loss * float("nan") if batch.step == 3 else loss), logs
    m, train, test, s = _setup(digits)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(learning rate 0\.0396"):
        fit(NaNAt3(m), train, s, replace(CFG, steps=10), progress=False, device="cpu")
    assert issubclass(NonFiniteLossError, ValueError)

def test_method_that_needs_unlabeled_data_without_mu(digits):
    class NeedsU(Supervised): uses_unlabeled = True
    m, train, test, s = _setup(digits)
    with pytest.raises(ValueError, match="mu >= 1"):
        fit(NeedsU(m), train, s, replace(CFG, mu=0), progress=False, device="cpu")

def test_unlabeled_batch_has_mu_times_batch_size_and_hidden_labels(digits):
    seen = {}
    class Spy(Supervised):
        uses_unlabeled = True
        def training_step(self, batch):
            seen["u"], seen["uy"], seen["x"] = batch.u.shape, batch.u_y, batch.x.shape
            return super().training_step(batch)
    m, train, test, s = _setup(digits)
    fit(Spy(m), train, s, replace(CFG, steps=2, mu=3), progress=False, device="cpu")
    assert seen["u"][0] == 3 * seen["x"][0] and seen["uy"].shape == (seen["u"][0],)

def test_ema_update_closed_form_including_buffers():
    a, b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        a.weight.fill_(1.0); b.weight.fill_(3.0)
        a.running_var.fill_(2.0); b.running_var.fill_(4.0); b.num_batches_tracked.fill_(5)
    for _ in range(3): ema_update(a, b, 0.5)
    # after n updates toward a constant target: target + (start - target) * d^n
    assert torch.allclose(a.weight, torch.full((3,), 3 - 2 * 0.125))
    assert torch.allclose(a.running_var, torch.full((3,), 4 - 2 * 0.125))
    assert int(a.num_batches_tracked) == 5
    with pytest.raises(ValueError): ema_update(a, b, 1.5)

def test_lr_schedule_values():
    cfg = FitConfig(steps=110, warmup=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, replace(cfg, schedule="constant")) == 1.0

def test_weight_decay_only_on_weights(digits):
    from ssl_book.train import make_optimizer
    m = _setup(digits)[0]
    groups = make_optimizer(m.parameters(), CFG).param_groups
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))

@pytest.mark.parametrize("kwargs", [dict(optimizer="lbfgs"), dict(steps=0), dict(ema_decay=1.0), dict(schedule="step"),
                                    dict(mu=-1), dict(lr=0.0), dict(warmup=-1), dict(pad_frac=0.5)])
def test_fit_config_rejects(kwargs):
    with pytest.raises(ValueError):
        FitConfig(**kwargs)

def test_training_learns_and_more_labels_help(digits):
    "Learning outcome of the loop itself: the tiny baseline is far above chance and grows with labels."
    preset = get_preset("tiny")
    train, test = digits
    accs = {}
    for n in (20, 200):
        s = split(train.labels, n, seed=0)
        h = fit(Supervised(make_model(preset, train, 0)), train, s, preset.fit, test, progress=False, device="cpu")
        accs[n] = h.final["test_acc"]
    assert accs[20] > 0.5                        # chance is 0.1
    assert accs[200] > accs[20] + 0.05

def test_fit_calls_setup_once_with_the_data_before_training(digits):
    train, test = digits
    preset = get_preset("tiny")
    s = split(train.labels, preset.n_labeled, preset.n_unlabeled, seed=0)
    calls = []
    class Probe(Supervised):
        def setup(self, tr, sp, device):
            calls.append(("setup", tr is train, sp is s, str(device)))
        def training_step(self, batch):
            calls.append("step")
            return super().training_step(batch)
    fit(Probe(make_model(preset, train, 0)), train, s, replace(preset.fit, steps=3, eval_every=3), progress=False,
        device="cpu")
    assert calls == [("setup", True, True, "cpu"), "step", "step", "step"]
