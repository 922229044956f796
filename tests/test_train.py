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


# --- Toolkit 2: hooks, label-free stages, run identity, precision, EMA warm-up -------------------------------
from ssl_book.train import Batch, ema_decay_at, make_optimizer, resolve_precision, run_identity

class _Recorder(Supervised):
    "Records what fit hands it, and uses every hook."
    def __init__(self, model):
        super().__init__(model)
        self.seen, self.modes = [], []
    def training_step(self, batch):
        self.seen.append((batch.idx.clone(), batch.x.clone()))
        self.modes.append(self.model.training)
        return super().training_step(batch)
    def metrics(self, test, device):
        return {"n_test": float(len(test)), "steps_seen": float(len(self.seen))}

def test_batch_carries_dataset_indices_and_metrics_hook_fills_history(digits):
    m, train, test, s = _setup(digits)
    rec = _Recorder(m)
    h = fit(rec, train, s, replace(CFG, steps=8, eval_every=4), test, progress=False, device="cpu")
    for idx, x in rec.seen:
        assert set(idx.tolist()) <= set(s.labeled.tolist()) and torch.equal(train.images[idx], x)
    assert h["n_test"] == [len(test)] * 2 and h["steps_seen"] == [4.0, 8.0]

def test_param_groups_lr_scale_and_train_mode_hooks(digits):
    m, train, test, s = _setup(digits)
    class Frozen(Supervised):
        "Only the head learns, at half the rate; the encoder stays in eval mode."
        def param_groups(self): return [{"params": list(self.model.head.parameters()), "lr_scale": 0.5}]
        def train_mode(self): self.model.train(); self.model.encoder.eval()
    enc = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    meth = Frozen(m)
    fit(meth, train, s, replace(CFG, steps=6, eval_every=6), progress=False, device="cpu")
    assert all(torch.equal(enc[k], v) for k, v in m.encoder.state_dict().items())   # BatchNorm buffers too
    opt = make_optimizer(meth.param_groups(), CFG)
    assert {g["lr_scale"] for g in opt.param_groups} == {0.5} and len(opt.param_groups) == 2   # weights / biases

def test_lr_scale_multiplies_the_scheduled_rate(digits):
    m, train, test, s = _setup(digits)
    seen = []
    class Spy(Supervised):
        def param_groups(self):
            return [{"params": list(self.model.head.parameters()), "lr_scale": 0.1},
                    {"params": list(self.model.encoder.parameters())}]
        def after_step(self, step): seen.append(sorted({g["lr"] for g in self.opt.param_groups}))
    meth = Spy(m)
    import ssl_book.train as T
    orig = T.make_optimizer
    def spy_opt(groups, cfg):
        meth.opt = orig(groups, cfg); return meth.opt
    T.make_optimizer = spy_opt
    try: fit(meth, train, s, replace(CFG, steps=3, eval_every=3, schedule="constant"), progress=False, device="cpu")
    finally: T.make_optimizer = orig
    assert all(v == pytest.approx([0.005, 0.05]) for v in seen)

def test_check_inputs_hook_lets_a_pretext_head_through(digits):
    m, train, test, s = _setup(digits)
    m.head = nn.Linear(m.feature_dim, 4)                  # e.g. 4 rotations: not the data's 10 classes
    with pytest.raises(ValueError, match="predicts 4 classes"):
        fit(Supervised(m), train, s, replace(CFG, steps=2), progress=False, device="cpu")
    class Pretext(Method):
        uses_labels = False
        def check_inputs(self, train, split, cfg): pass
        def training_step(self, batch):
            return self.model(batch.aug.weak(batch.x)).logsumexp(1).mean(), {}
    fit(Pretext(m), train, s, replace(CFG, steps=2), test, progress=False, device="cpu")     # accepted

class _Rotation(Method):
    "A label-free pretext task for the tests: predict which of 4 rotations was applied."
    name = "rotation"
    uses_labels = False
    def check_inputs(self, train, split, cfg): pass
    def training_step(self, batch):
        assert batch.y is None and batch.u_y is None
        x = batch.aug.weak(batch.x)
        r = torch.randint(0, 4, (len(x),), generator=batch.aug.g)
        xr = torch.stack([torch.rot90(xi, int(k), dims=(1, 2)) for xi, k in zip(x, r)])
        logits = self.model(xr)
        return nn.functional.cross_entropy(logits, r), {"rot_acc": (logits.argmax(1) == r).float().mean()}

def test_label_free_stage_touches_no_label(digits):
    "Labels replaced by -1 give bit-identical weights: the stage never reads one."
    import copy as _copy
    train, test = digits
    s = split(train.labels, 50, seed=0)
    weights = []
    for hide in (False, True):
        data = _copy.copy(train)
        if hide: data.labels = torch.full_like(train.labels, -1)            # bypasses the ImageSet check on purpose
        torch.manual_seed(0)
        from ssl_book.models import small_cnn
        m = small_cnn(in_channels=1, width=8, n_classes=4)
        h = fit(_Rotation(m), data, s, replace(CFG, steps=6, eval_every=6), test, progress=False, device="cpu")
        assert "test_acc" not in h.final and "rot_acc" in h.final        # no test accuracy for a pretext head
        weights.append(m.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

def test_label_free_stage_draws_from_labeled_and_unlabeled(digits):
    train, test = digits
    s = split(train.labels, 20, n_unlabeled=40, seed=0)
    from ssl_book.models import small_cnn
    rot = _Rotation(small_cnn(in_channels=1, width=8, n_classes=4))
    seen = set()
    orig = rot.training_step
    rot.training_step = lambda b: (seen.update(b.idx.tolist()), orig(b))[1]
    fit(rot, train, s, replace(CFG, steps=12, batch_size=10), progress=False, device="cpu")
    pool = set(s.labeled.tolist()) | set(s.unlabeled.tolist())
    assert seen == pool                                    # 120 draws cover the 60 images; nothing else is drawn

def test_run_identity_includes_the_methods_settings(digits, tmp_path):
    "Regression: FixMatch(tau=0.0) silently resumed a finished tau=0.95 run and returned its history."
    from ssl_book.consistency import FixMatch
    train, test = digits
    s = split(train.labels, 50, seed=0)
    cfg = replace(CFG, steps=4, eval_every=4, mu=1)
    ck = tmp_path / "fm.pt"
    fit(FixMatch(_setup(digits)[0], tau=0.95), train, s, cfg, checkpoint=ck, progress=False, device="cpu")
    with pytest.raises(ValueError, match="another run"):
        fit(FixMatch(_setup(digits)[0], tau=0.0), train, s, cfg, checkpoint=ck, progress=False, device="cpu")
    a = run_identity(FixMatch(nn.Linear(2, 2), tau=0.95), train, s, cfg)
    b = run_identity(FixMatch(nn.Linear(2, 2), tau=0.0), train, s, cfg)
    assert a["settings"] == {"tau": 0.95, "lam": 1.0} and b["settings"]["tau"] == 0.0 and a != b

def test_ema_warms_up_like_mean_teacher():
    assert ema_decay_at(0, 0.999) == 0.5 and ema_decay_at(1, 0.999) == pytest.approx(2 / 3)
    assert ema_decay_at(10_000, 0.99) == 0.99 and ema_decay_at(3, 0.0) == 0.0
    with pytest.raises(ValueError): ema_decay_at(0, 1.5)

def test_fit_ema_after_one_step_is_the_mean_of_start_and_step(digits):
    "With the warm-up, the first EMA update gives equal weight to the initial and the trained weights."
    import copy as _copy
    m, train, test, s = _setup(digits)
    start = _copy.deepcopy(m.state_dict())
    meth = Supervised(m)
    fit(meth, train, s, replace(CFG, steps=1, eval_every=1, ema_decay=0.999), progress=False, device="cpu")
    e = meth.ema_model.state_dict()
    w = "head.weight"
    assert torch.allclose(e[w], 0.5 * start[w] + 0.5 * m.state_dict()[w], atol=1e-7)

def test_precision_switch():
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "mps") == "fp32"
    from ssl_book.train import cpu_has_bf16
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision"): FitConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision"): resolve_precision("half", "cpu")

def test_bf16_training_learns_and_resumes_bit_exact(digits, tmp_path):
    "bf16 autocast on the CPU (slow without AMX, but correct): it takes effect, and a resume gives the same weights."
    cfg = replace(CFG, steps=16, eval_every=8, precision="bf16")
    ref, train, test, s = _setup(digits)
    h = fit(Supervised(ref), train, s, cfg, test, progress=False, device="cpu")
    f32, *_ = _setup(digits)
    h32 = fit(Supervised(f32), train, s, replace(cfg, precision="fp32"), test, progress=False, device="cpu")
    assert not torch.equal(ref.head.weight, f32.head.weight)                # autocast really ran in bf16
    assert abs(h.final["loss"] - h32.final["loss"]) < 0.1 and h.final["loss"] < h.rows[0]["loss"]
    m, *_ = _setup(digits)
    with pytest.raises(KeyboardInterrupt):
        fit(_Crash(m, at=11), train, s, cfg, test, checkpoint=tmp_path / "c.pt", progress=False, device="cpu")
    m2, *_ = _setup(digits)
    fit(Supervised(m2), train, s, cfg, test, checkpoint=tmp_path / "c.pt", progress=False, device="cpu")
    assert all(torch.equal(ref.state_dict()[k], m2.state_dict()[k]) for k in ref.state_dict())

def test_settings_are_the_constructor_arguments():
    from ssl_book.mixmatch import MixMatch
    st = MixMatch(nn.Linear(2, 2), T=0.3).settings()
    assert st["T"] == 0.3 and st["K"] == 2 and "ema" not in st and "model" not in st

def test_fit_trains_the_convolutions_channels_last_on_the_cpu():
    "The layout that made fp32 steps 1.2-1.5x faster on the book's CPU (bench/channels_last.py), for the EMA model too."
    import torch
    from ssl_book.data import make_synthetic, split
    from ssl_book.models import small_cnn
    from ssl_book.train import FitConfig, Supervised, fit
    data = make_synthetic(n_per_class=8, n_classes=2, size=8)
    m = Supervised(small_cnn(3, 2, 8))
    assert all(p.is_contiguous() for p in m.model.parameters())               # as built
    fit(m, data, split(data.labels, 8), FitConfig(steps=2, batch_size=4, eval_every=2, ema_decay=0.9, precision="fp32"), data,
        progress=False, device="cpu")
    convs = [p for p in m.model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in m.ema_model.parameters() if p.ndim == 4)
