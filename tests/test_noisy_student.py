"Chapter 6: distillation, pseudo-label targets and balancing, stochastic depth, SWA, and Noisy Student's outcome."
import numpy as np
import pytest
import torch
import torch.nn as nn
from dataclasses import replace

from ssl_book.data import make_synthetic, split, to_unit
from ssl_book.experiment import make_model, run_experiment
from ssl_book.models import build_model, small_cnn, wide_resnet
from ssl_book.noisy_student import (NOISY_STUDENT_ABLATIONS, SWA, Distill, DropPath, NoisyStudent, add_stochastic_depth,
                                    balance_weights, distill_loss, noisy, noisy_student_recipe, residual_blocks,
                                    scaled_model, teacher_targets)
from ssl_book.presets import get_preset
from ssl_book.train import Method, Supervised, fit


def _kd_numpy(s: np.ndarray, t: np.ndarray, T: float) -> float:
    "KL(softmax(t/T) || softmax(s/T)) * T², batch mean, in float64 (0 log 0 = 0)."
    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    lp, lq = log_softmax(t / T), log_softmax(s / T)
    p = np.exp(lp)
    return T * T * float(np.where(p > 0, p * (lp - lq), 0.0).sum(1).mean())

@pytest.mark.parametrize("T", [0.5, 1.0, 3.0, 10.0])
def test_distill_loss_matches_numpy(T):
    g = torch.Generator().manual_seed(int(T * 10))
    s, t = torch.randn(16, 7, generator=g) * 2, torch.randn(16, 7, generator=g) * 2
    ref = _kd_numpy(s.double().numpy(), t.double().numpy(), T)
    assert distill_loss(s, t, T).item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert distill_loss(s, t, T, scale_t2=False).item() == pytest.approx(ref / T ** 2, rel=1e-5, abs=1e-8)

def test_distill_loss_is_zero_for_equal_logits_and_handles_a_saturated_teacher():
    z = torch.randn(5, 4)
    assert distill_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    t = torch.tensor([[1000.0, 0, 0, 0]])                              # softmax is exactly one-hot
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.isfinite(distill_loss(s, t, 1.0)) and distill_loss(s, t, 1.0).item() == pytest.approx(-s.log_softmax(1)[0, 0].item(), rel=1e-5)

def test_distill_loss_sends_no_gradient_to_the_teacher_and_t2_keeps_gradients_of_one_size():
    s, t = torch.randn(64, 10, requires_grad=True), torch.randn(64, 10, requires_grad=True)
    distill_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None
    def grad(T, scale):
        x = (s.detach() * 3).requires_grad_(True)
        distill_loss(x, t.detach() * 3, T, scale).backward()
        return x.grad.norm().item()
    assert grad(20, True) / grad(10, True) == pytest.approx(1.0, abs=0.05)         # with T²: about constant
    assert grad(20, False) / grad(10, False) == pytest.approx(0.25, abs=0.03)      # without: falls like 1/T²

def test_distill_loss_bad_input():
    with pytest.raises(ValueError, match="one shape"): distill_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one shape"): distill_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="T must be > 0"): distill_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)

def test_teacher_targets_soft_and_hard():
    z = torch.randn(20, 6)
    soft = teacher_targets(z)
    assert torch.allclose(soft.sum(1), torch.ones(20)) and torch.equal(soft.argmax(1), z.argmax(1))
    hard = teacher_targets(z, hard=True)
    assert torch.equal(hard.sum(1), torch.ones(20)) and torch.equal(hard.argmax(1), z.argmax(1)) and set(hard.unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(teacher_targets(z, T=1e4), torch.full((20, 6), 1 / 6), atol=1e-3)   # hot: uniform
    with pytest.raises(ValueError, match=r"\[N, C\]"): teacher_targets(torch.zeros(3))
    with pytest.raises(ValueError, match="T must be > 0"): teacher_targets(z, T=-1.0)

def test_balance_weights_counts_against_a_hand_oracle():
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(300, 5, generator=g) * 2).softmax(1)
    keep = probs.max(1).values >= 0.3
    conf, pred = probs.max(1)
    for per_class in (5, 40, 200):
        w = balance_weights(probs, keep, per_class)
        assert (w[~keep] == 0).all()
        for c in range(5):
            rows = torch.nonzero(keep & (pred == c)).flatten()
            if len(rows) == 0: continue
            assert w[rows].sum().item() == pytest.approx(per_class)           # every class weighs per_class
            if len(rows) > per_class:                                           # the most confident, each once
                chosen = set(rows[conf[rows].argsort(descending=True)[:per_class]].tolist())
                assert set(torch.nonzero(w * (pred == c)).flatten().tolist()) == chosen
    mean_count = round(int(keep.sum()) / 5)
    assert balance_weights(probs, keep).sum().item() == pytest.approx(mean_count * 5, rel=1e-6)   # default: the mean

def test_balance_weights_bad_input():
    p = torch.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="bool"): balance_weights(p, torch.ones(4))
    with pytest.raises(ValueError, match="shape"): balance_weights(p, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="per_class"): balance_weights(p, torch.ones(4, dtype=torch.bool), 0)

def test_drop_path_is_the_block_in_eval_and_unbiased_in_training():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    block = type("Res", (nn.Module,), {"forward": lambda self, x: x + lin(x)})()
    d = DropPath(block, 0.7)
    x = torch.randn(8, 6)
    with torch.no_grad():
        assert torch.equal(d.eval()(x), block(x))
        d.train()
        outs = torch.stack([d(x) for _ in range(20000)])
    assert (outs.mean(0) - block(x)).abs().max().item() < 0.05
    skipped = (outs - x).abs().sum(-1) < 1e-6                              # per image: f dropped
    assert skipped.float().mean().item() == pytest.approx(0.3, abs=0.02)
    with pytest.raises(ValueError, match="survival"): DropPath(block, 0.0)

def test_stochastic_depth_wraps_the_identity_blocks_and_keeps_the_mode():
    from torchvision.models import resnet18
    r = resnet18(num_classes=10).eval()
    assert len(residual_blocks(r)) == 5                    # 8 blocks, 3 with a downsampling shortcut
    add_stochastic_depth(r, 0.8)
    drops = [m for m in r.modules() if isinstance(m, DropPath)]
    assert [round(d.survival, 2) for d in drops] == [0.96, 0.92, 0.88, 0.84, 0.8] and not any(d.training for d in drops)
    w = wide_resnet(28, 2)
    assert len(residual_blocks(w)) == 9
    with pytest.raises(ValueError, match="residual"): add_stochastic_depth(small_cnn(3, 10, 8))

def test_noisy_sets_dropout_and_depth_where_possible():
    m = noisy(wide_resnet(10, 1, in_channels=1), dropout=0.3)
    assert m.dropout.p == 0.3 and any(isinstance(x, DropPath) for x in m.modules())
    c = noisy(small_cnn(1, 10, 8), dropout=0.5)                        # no residual blocks: dropout only
    assert c.dropout.p == 0.5 and not any(isinstance(x, DropPath) for x in c.modules())
    with pytest.raises(ValueError, match="dropout"): noisy(small_cnn(1, 10, 8), dropout=1.0)
    with pytest.raises(ValueError, match="Classifier"): noisy(nn.Linear(3, 3))

@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(n_per_class=40, n_classes=4, size=8, seed=0), make_synthetic(n_per_class=10, n_classes=4, size=8, seed=1)

class _Snapshots(Supervised):
    "Supervised training that keeps a copy of the weights after every step."
    def setup(self, train, split, device): self.snaps = []
    def after_step(self, step): self.snaps.append([p.detach().clone() for p in self.model.parameters()])

def test_swa_average_is_the_mean_of_its_snapshots_and_bn_is_recomputed(tiny_data):
    train, test = tiny_data
    s = split(train.labels, 40, seed=0)
    cfg = replace(get_preset("tiny").fit, steps=40, eval_every=40, ema_decay=0.0)
    inner = _Snapshots(small_cnn(3, 4, 8))
    m = SWA(inner, start=0.5, every=5)
    fit(m, train, s, cfg, test, progress=False, device="cpu")
    taken = [inner.snaps[i] for i in range(m.first_step, 40, 5)]        # steps 20, 25, ..., 35
    assert m.first_step == 20 and int(m.average.n_averaged) == len(taken) == 4
    avg = m.eval_model()
    for a, ps in zip(avg.parameters(), zip(*taken)):
        assert torch.allclose(a, torch.stack(ps).mean(0), atol=1e-6)
    bn = avg.encoder[1][1]
    x = to_unit(train.images[m._bn_idx])
    with torch.no_grad(): by_hand = avg.encoder[1][0](avg.encoder[0](x)).mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, by_hand, atol=1e-4)
    assert avg is not m.model and m.settings()["swa_start"] == 0.5

class _Stop(Exception): pass

class _StopsOnce(Supervised):
    "Raises once at step `at` (an interrupted run), then trains normally."
    stopped = False
    def __init__(self, model, at: int):
        super().__init__(model); self.at = at
    def after_step(self, step):
        if step == self.at and not _StopsOnce.stopped:
            _StopsOnce.stopped = True
            raise _Stop()

def test_swa_resumes_from_a_checkpoint_exactly(tiny_data, tmp_path):
    train, test = tiny_data
    s = split(train.labels, 40, seed=0)
    cfg = replace(get_preset("tiny").fit, steps=40, eval_every=10, ema_decay=0.0)
    make = lambda: SWA(_StopsOnce(small_cnn(3, 4, 8), at=10**9), start=0.25, every=3)
    torch.manual_seed(0); full = make()
    fit(full, train, s, cfg, test, progress=False, device="cpu")
    ck = tmp_path / "swa.pt"
    torch.manual_seed(0); first = SWA(_StopsOnce(small_cnn(3, 4, 8), at=25), start=0.25, every=3)
    with pytest.raises(_Stop): fit(first, train, s, cfg, test, progress=False, device="cpu", checkpoint=ck)
    torch.manual_seed(0); resumed = SWA(_StopsOnce(small_cnn(3, 4, 8), at=25), start=0.25, every=3)
    fit(resumed, train, s, cfg, test, progress=False, device="cpu", checkpoint=ck)      # from step 20
    assert int(resumed.average.n_averaged) == int(full.average.n_averaged)
    for a, b in zip(resumed.eval_model().state_dict().values(), full.eval_model().state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    with pytest.raises(ValueError, match="start"): SWA(Supervised(small_cnn(3, 4, 8)), start=1.0)
    with pytest.raises(ValueError, match="Method"): SWA(small_cnn(3, 4, 8))

def test_distill_keeps_the_teacher_fixed_and_in_eval_mode(tiny_data):
    train, test = tiny_data
    s = split(train.labels, 40, seed=0)
    teacher = small_cnn(3, 4, 8, dropout=0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = replace(get_preset("tiny").fit, steps=10, eval_every=10)
    fit(Distill(small_cnn(3, 4, 8), teacher), train, s, cfg, test, progress=False, device="cpu")
    assert not teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="another model"): Distill(teacher, teacher)
    with pytest.raises(ValueError, match="alpha"): Distill(small_cnn(3, 4, 8), teacher, alpha=1.5)

def test_noisy_student_targets_filter_and_hidden_label_stats(tiny_data):
    train, test = tiny_data
    s = split(train.labels, 8, seed=0)
    teacher = small_cnn(3, 4, 8)
    ns = NoisyStudent(small_cnn(3, 4, 8), teacher, soft=False, threshold=0.0, balance=False)
    ns.setup(train, s, torch.device("cpu"))
    t = ns._targets[s.unlabeled]
    assert torch.equal(t.sum(1), torch.ones(len(s.unlabeled))) and (ns._weights[s.unlabeled] == 1).all()
    assert (ns._targets[s.labeled] == 0).all()                              # only the pool is pseudo-labeled
    logits = torch.cat([teacher.eval()(to_unit(train.images[s.unlabeled]))])
    right = (logits.argmax(1) == train.labels[s.unlabeled]).float().mean().item()
    assert ns.pool_stats["pl_acc"] == pytest.approx(right, abs=1e-6) and ns.pool_stats["kept"] == 1.0
    strict = NoisyStudent(small_cnn(3, 4, 8), teacher, threshold=1.0)
    strict.setup(train, s, torch.device("cpu"))
    assert strict.pool_stats["kept"] < 1.0
    with pytest.raises(ValueError, match="another model"): NoisyStudent(teacher, teacher)
    with pytest.raises(ValueError, match="label_smoothing"): NoisyStudent(small_cnn(3, 4, 8), teacher, label_smoothing=1.0)

def test_recipe_sizes_and_bad_widths(digits):
    preset = get_preset("tiny")
    train, _ = digits
    base = make_model(preset, train, 0)
    wide = scaled_model(preset, base, 1.5)
    assert wide.head.in_features == 4 * 24 and torch.equal(wide.encoder[0].mean, base.encoder[0].mean)
    r = noisy_student_recipe(preset)
    assert [s.name for s in r.stages] == ["teacher", "student 1 (x1)", "student 2 (x1.5)"]
    with pytest.raises(ValueError, match="as large"): noisy_student_recipe(preset, widths=(0.5,))
    with pytest.raises(ValueError, match="shrink"): noisy_student_recipe(preset, widths=(2.0, 1.0))
    with pytest.raises(ValueError, match="no width"): scaled_model(replace(preset, model="resnet18"), base, 2.0)
    ids = {name: noisy_student_recipe(preset, name="x", **change).identity() for name, change in NOISY_STUDENT_ABLATIONS.items()}
    ids["full"] = noisy_student_recipe(preset, name="x").identity()
    assert len({repr(v) for v in ids.values()}) == len(ids)                 # every ablation is a run of its own

@pytest.mark.slow
def test_noisy_students_beat_their_teacher_and_the_baseline_on_digits(digits):
    "Learning outcome (tiny preset, seeds 0-2): the last student beats the first teacher by >= 2 points (9 of 450 test images)."
    recs = run_experiment("tiny", ["supervised", "noisy_student"], seeds=[0, 1, 2], data=digits, device="cpu")
    by = {(r["method"], r["seed"]): r for r in recs}
    for seed in (0, 1, 2):
        ns = by["noisy_student", seed]
        teacher, student = 100 * ns["stage_histories"][0][-1]["test_acc"], 100 * ns["test_acc"]
        assert student >= teacher + 2.0, (seed, teacher, student)
        assert student > 100 * by["supervised", seed]["test_acc"], (seed, student)
