"ssl_book.consistency: oracles for the losses and the VAT direction, EMA and BatchNorm semantics, bad input, and learning outcomes."
import math
from dataclasses import replace

import numpy as np
import pytest
from conftest import train_registered_on_tiny
import torch
import torch.nn as nn

from ssl_book.augment import Augmenter
from ssl_book.consistency import (FixMatch, MeanTeacher, PiModel, UDA, VAT, bn_stats_frozen, fixmatch_loss,
                                  kl_from_logits, pseudo_label_accuracy, sigmoid_rampup, softmax_mse, uda_loss,
                                  vat_perturbation)
from ssl_book.data import split
from ssl_book.experiment import make_model
from ssl_book.presets import get_preset
from ssl_book.train import METHODS, Batch, History, fit

def _np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

# ---- ramp-up ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,length,expected", [(0, 100, math.exp(-5)), (50, 100, math.exp(-1.25)),
                                               (80, 100, math.exp(-5 * 0.04)), (100, 100, 1.0), (10**6, 100, 1.0),
                                               (-7, 100, math.exp(-5)), (3, 0, 1.0)])
def test_sigmoid_rampup_values(t, length, expected):
    assert sigmoid_rampup(t, length) == pytest.approx(expected, rel=1e-12)

def test_sigmoid_rampup_is_monotone_and_rejects_negative_length():
    v = [sigmoid_rampup(t, 37) for t in range(60)]
    assert all(a < b for a, b in zip(v[:37], v[1:38])) and v[37:] == [1.0] * 23
    with pytest.raises(ValueError): sigmoid_rampup(1, -1)

# ---- losses on fixed logits: hand computations and NumPy ------------------------------------------------

def test_softmax_mse_by_hand_and_against_numpy():
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # (0.5, 0.5) vs (0.75, 0.25)
    assert softmax_mse(a, b).item() == pytest.approx(0.0625, abs=1e-7)
    z1, z2 = np.random.default_rng(0).normal(size=(2, 16, 7))
    ref = ((_np_softmax(z1) - _np_softmax(z2)) ** 2).mean()
    assert softmax_mse(torch.tensor(z1), torch.tensor(z2)).item() == pytest.approx(ref, rel=1e-10)

def test_kl_from_logits_by_hand_and_properties():
    p, q = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    assert kl_from_logits(p, q).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-7)
    z = torch.randn(8, 5)
    assert kl_from_logits(z, z).item() == pytest.approx(0.0, abs=1e-6) and kl_from_logits(z, z + 1.0).abs() < 1e-6
    assert kl_from_logits(z, torch.randn(8, 5)) > 0

def test_fixmatch_loss_by_hand():
    weak = torch.log(torch.tensor([[0.96, 0.04], [0.90, 0.10], [0.02, 0.98]]))
    strong = torch.tensor([[0.0, 0.0], [5.0, -5.0], [0.0, math.log(3.0)]])
    loss, mask, pseudo = fixmatch_loss(weak, strong, tau=0.95)
    assert mask.tolist() == [1.0, 0.0, 1.0] and pseudo.tolist() == [0, 0, 1]
    # CE(uniform, 0) = log 2; CE((0.25, 0.75), 1) = -log 0.75; the masked-out row counts in the mean
    assert loss.item() == pytest.approx((math.log(2) - math.log(0.75)) / 3, abs=1e-6)
    assert fixmatch_loss(weak, strong, tau=0.0)[1].sum() == 3 and fixmatch_loss(weak, strong, tau=1.0)[1].sum() == 0

def test_uda_loss_against_numpy():
    rng = np.random.default_rng(1)
    zw, zs = rng.normal(size=(32, 6)) * 2, rng.normal(size=(32, 6))
    loss, mask, pseudo = uda_loss(torch.tensor(zw), torch.tensor(zs), temperature=0.4, tau=0.5)
    pw = _np_softmax(zw)
    keep = pw.max(1) >= 0.5
    sharp = pw ** (1 / 0.4); sharp /= sharp.sum(1, keepdims=True)           # p^(1/T) renormalised
    ce = -(sharp * np.log(_np_softmax(zs))).sum(1)
    assert 0 < keep.sum() < 32
    assert loss.item() == pytest.approx((ce * keep).mean(), rel=1e-9)
    assert mask.numpy().tolist() == keep.astype(float).tolist() and (pseudo.numpy() == pw.argmax(1)).all()

@pytest.mark.parametrize("loss_fn", [lambda t, p: softmax_mse(p, t), lambda t, p: kl_from_logits(t, p),
                                     lambda t, p: fixmatch_loss(t, p, 0.2)[0], lambda t, p: uda_loss(t, p, 0.4, 0.2)[0]],
                         ids=["softmax_mse", "kl", "fixmatch", "uda"])
def test_no_gradient_flows_into_targets(loss_fn):
    target = (3 * torch.randn(16, 4)).requires_grad_(True)
    pred = torch.randn(16, 4, requires_grad=True)
    loss_fn(target, pred).backward()
    assert target.grad is None and pred.grad is not None and pred.grad.abs().sum() > 0

# ---- VAT ---------------------------------------------------------------------------------------------------

def test_vat_perturbation_has_norm_eps_per_example():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.rand(7, 3, 2, 2)
    r = vat_perturbation(model, x, eps=0.37, xi=1e-3)
    assert r.shape == x.shape
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((7,), 0.37), atol=1e-6)

def test_vat_power_iteration_finds_the_top_eigenvector_of_the_kl_hessian():
    torch.manual_seed(3)
    lin = nn.Linear(6, 4, bias=False).double()
    x = torch.randn(3, 6, dtype=torch.double)
    r = vat_perturbation(lin, x, eps=1.0, xi=1e-6, n_power=40)
    for i in range(3):                                   # per example: H = W^T (diag p - p p^T) W
        p = lin(x[i:i + 1]).softmax(1)[0]
        H = lin.weight.T @ (torch.diag(p) - torch.outer(p, p)) @ lin.weight
        top = torch.linalg.eigh(H).eigenvectors[:, -1]
        assert abs(torch.dot(r[i], top).item()) > 0.999

def test_vat_probing_does_not_move_batchnorm_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vat_perturbation(model, torch.rand(5, 1, 6, 6), eps=1.0, xi=1e-2, n_power=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[1].momentum == 0.1                      # restored after the block

def test_vat_perturbation_is_a_constant_and_works_under_no_grad_and_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.rand(6, 3, 8, 8)
    r32 = vat_perturbation(model, x, eps=1.0, xi=0.05, n_power=3, generator=torch.Generator().manual_seed(1))
    assert not r32.requires_grad
    with torch.no_grad():
        r_ng = vat_perturbation(model, x, eps=1.0, xi=0.05, n_power=3, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_ac = vat_perturbation(model, x, eps=1.0, xi=0.05, n_power=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r_ng, r32) and r_ac.dtype == torch.float32 and torch.allclose(r_ac, r32, atol=1e-6)

def test_bn_stats_frozen_restores_cumulative_layers_and_nan_batches():
    bn = nn.BatchNorm1d(2, momentum=None).train()                   # cumulative moving average
    bn(torch.randn(20, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with bn_stats_frozen(bn):
        bn(torch.randn(20, 2) + 5)
        bn(torch.full((20, 2), float("nan")))
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())

def test_bn_stats_frozen_still_uses_batch_statistics_in_training_mode():
    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(50, 3) * 4 + 2
    with bn_stats_frozen(bn): y = bn(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-5)            # normalised with the batch's stats
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0

# ---- Mean Teacher: EMA including BatchNorm buffers --------------------------------------------------------

def _tiny_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))

def test_mean_teacher_ema_closed_form_including_buffers():
    student = _tiny_bn_model()
    mt = MeanTeacher(student, decay=0.9, dropout=None)
    t0 = {k: v.clone() for k, v in mt.teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters(): p.add_(1.0)
        student[1].running_mean.fill_(2.0); student[1].num_batches_tracked.fill_(7)
    s = {k: v.clone() for k, v in student.state_dict().items()}
    mt.after_step(0)                                     # warm-up: decay min(0.9, 1 - 1/2) = 0.5
    mt.after_step(1)                                     # min(0.9, 1 - 1/3) = 2/3
    mt.after_step(100)                                   # 0.9
    keep = 0.5 * (2 / 3) * 0.9                           # the share of the initial teacher that remains
    for k, v in mt.teacher.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, keep * t0[k] + (1 - keep) * s[k], atol=1e-6), k
        else:
            assert torch.equal(v, s[k]), k               # num_batches_tracked is copied
    assert all(not p.requires_grad for p in mt.teacher.parameters())

def test_mean_teacher_step_leaves_teacher_buffers_and_grads_alone(digits):
    train, _ = digits
    preset = get_preset("tiny")
    mt = MeanTeacher(make_model(preset, train, 0), rampup=10)
    before = {k: v.clone() for k, v in mt.teacher.state_dict().items()}
    x, u = train.images[:8], train.images[8:32]
    loss, logs = mt.training_step(Batch(x, train.labels[:8], u, train.labels[8:32], Augmenter(0, False), step=3))
    loss.backward()
    torch.optim.SGD(mt.model.parameters(), lr=0.1).step()           # a student step leaves the teacher alone
    assert all(torch.equal(before[k], v) for k, v in mt.teacher.state_dict().items())
    assert all(p.grad is not None for p in mt.model.parameters() if p.requires_grad)
    assert mt.eval_model() is mt.teacher and mt.owns_ema and set(logs) == {"sup", "unsup", "w"}

# ---- methods: logs and bad input -------------------------------------------------------------------------

class _Stub(nn.Module):
    "Ignores its input and returns fixed logits (rows: labeled, then weak, then strong views)."
    def __init__(self, logits): super().__init__(); self.logits = nn.Parameter(logits)
    def forward(self, x): return self.logits

def test_fixmatch_logs_mask_and_pseudo_label_accuracy_from_hidden_labels():
    lab = torch.zeros(2, 3)
    weak = torch.log(torch.tensor([[0.97, 0.02, 0.01], [0.01, 0.98, 0.01], [0.5, 0.3, 0.2], [0.02, 0.02, 0.96]]))
    fm = FixMatch(_Stub(torch.cat([lab, weak, torch.zeros(4, 3)])), tau=0.95)
    u_y = torch.tensor([0, 2, 0, 2])          # pseudo-labels 0, 1, 0, 2: kept rows 0, 1, 3, of which 0 and 3 right
    x, u = torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    _, logs = fm.training_step(Batch(x, torch.tensor([0, 1]), u, u_y, Augmenter(1, False), step=0))
    assert logs["mask"].item() == pytest.approx(3 / 4) and logs["masked_correct"].item() == pytest.approx(2 / 4)
    assert logs["pseudo_acc_all"].item() == pytest.approx(3 / 4)                # row 2 is right but not kept
    _, logs = fm.training_step(Batch(x, torch.tensor([0, 1]), u, None, Augmenter(1, False), step=0))
    assert set(logs) == {"sup", "unsup", "mask"}                     # no hidden labels, nothing to measure
    acc = pseudo_label_accuracy(History([{"masked_correct": 0.2, "mask": 0.25}, {"masked_correct": 0.0, "mask": 0.0}]))
    assert acc[0] == pytest.approx(0.8) and math.isnan(acc[1])

@pytest.mark.parametrize("call", [
    lambda: fixmatch_loss(torch.zeros(2, 3), torch.zeros(2, 3), tau=1.5),
    lambda: fixmatch_loss(torch.zeros(2, 3), torch.zeros(3, 3)),
    lambda: uda_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0),
    lambda: uda_loss(torch.zeros(2, 3), torch.zeros(2, 3), tau=-0.1),
    lambda: softmax_mse(torch.zeros(2, 3), torch.zeros(2, 4)),
    lambda: vat_perturbation(nn.Linear(3, 2), torch.zeros(2, 3), eps=0.0, xi=0.1),
    lambda: vat_perturbation(nn.Linear(3, 2), torch.zeros(2, 3), eps=1.0, xi=0.1, n_power=0),
    lambda: PiModel(nn.Linear(3, 2), dropout=None, w_max=-1),
    lambda: PiModel(nn.Linear(3, 2), dropout=1.0),
    lambda: MeanTeacher(nn.Linear(3, 2), dropout=None, decay=1.0),
    lambda: FixMatch(nn.Linear(3, 2), tau=2.0),
    lambda: UDA(nn.Linear(3, 2), temperature=-1.0),
    lambda: VAT(nn.Linear(3, 2), eps_rms=0.0),
    lambda: VAT(nn.Linear(3, 2), n_power=0),
    lambda: MeanTeacher(nn.Linear(3, 2), dropout=None, rampup=-1),
    lambda: FixMatch(nn.Linear(3, 2), lam=-1.0),
    lambda: vat_perturbation(nn.Linear(3, 2), torch.zeros(2, 3, dtype=torch.uint8), eps=1.0, xi=0.1),
], ids=lambda f: "")
def test_bad_input_is_a_value_error(call):
    with pytest.raises(ValueError):
        call()

def test_all_five_methods_and_uda_are_registered(digits):
    preset = get_preset("tiny")
    for name in ("pi", "mean_teacher", "vat", "fixmatch", "uda"):
        m = METHODS[name](make_model(preset, digits[0]), preset)
        assert m.name == name and m.uses_unlabeled
    assert METHODS["mean_teacher"](make_model(preset, digits[0]), get_preset("gpu")).decay == 0.999
    assert METHODS["pi"](make_model(preset, digits[0]), preset).rampup == 90

def test_pi_stop_gradient_choice_changes_the_gradient(digits):
    train, _ = digits
    grads = {}
    for stop in (True, False):
        pi = PiModel(make_model(get_preset("tiny"), train, 0), dropout=None, rampup=0, stop_gradient=stop)
        batch = Batch(train.images[:8], train.labels[:8], train.images[8:40], None, Augmenter(2, False), step=0)
        loss, logs = pi.training_step(batch)
        loss.backward()
        grads[stop] = torch.cat([p.grad.flatten() for p in pi.model.parameters()])
        assert logs["unsup"] > 0
    assert not torch.allclose(grads[True], grads[False])

# ---- learning outcomes on the embedded digits (tiny preset) -----------------------------------------------

MARGIN = 2.0   # percentage points above the supervised baseline, on each seed

@pytest.fixture(scope="module")
def tiny_runs(digits):
    "Supervised and each consistency method on the tiny preset, seeds 0-2, same split per seed."
    return train_registered_on_tiny(digits, ("supervised", "pi", "mean_teacher", "vat", "fixmatch", "uda"))

@pytest.mark.slow
@pytest.mark.parametrize("name", ["pi", "mean_teacher", "vat", "fixmatch", "uda"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_method_beats_supervised_on_digits(tiny_runs, name, seed):
    base = 100 * tiny_runs["supervised", seed].final["test_acc"]
    acc = 100 * tiny_runs[name, seed].final["test_acc"]
    assert acc >= base + MARGIN, f"{name} {acc:.2f}% vs supervised {base:.2f}% (seed {seed}; margin {MARGIN})"

@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixmatch_mask_rate_rises(tiny_runs, seed):
    mask = tiny_runs["fixmatch", seed]["mask"]
    assert mask[-1] > mask[0] + 0.3 and mask[-1] >= max(mask[:-1]) - 0.05, mask

def test_bench_prints_a_row_for_each_consistency_method(tmp_path, capsys):
    from ssl_book.cli import main
    names = ["supervised", "pi", "mean_teacher", "vat", "fixmatch"]
    assert main(["bench", "--preset", "tiny", "--methods", *names, "--seeds", "0", "--steps", "20",
                 "--out", str(tmp_path)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.split()[:1]]
    assert all(n in rows for n in names), rows

def test_pi_model_trains_with_a_frozen_target_pass_after_the_graded_pass(digits):
    "The frozen target pass comes after the pass with gradients; restoring BatchNorm must not break backward."
    train, _ = digits
    pi = PiModel(make_model(get_preset("tiny"), train, 0), rampup=0)
    before = {k: v.clone() for k, v in pi.model.state_dict().items() if "running" in k}
    loss, _ = pi.training_step(Batch(train.images[:8], train.labels[:8], train.images[8:40], None,
                                     Augmenter(3, False), step=0))
    loss.backward()
    after = {k: v for k, v in pi.model.state_dict().items() if "running" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the graded pass did update them, once

def test_fit_adds_no_ema_for_a_method_that_owns_one_and_reports_its_teacher(digits):
    train, test = digits
    preset = get_preset("tiny")
    s = split(train.labels, preset.n_labeled, preset.n_unlabeled, seed=0)
    mt = MeanTeacher(make_model(preset, train, 0), rampup=5, decay=0.9)
    h = fit(mt, train, s, replace(preset.fit, steps=10, eval_every=10, ema_decay=0.99), test, progress=False,
            device="cpu")
    from ssl_book.evaluate import accuracy
    assert mt.ema_model is None                                       # no second average beside the teacher
    assert h.final["test_acc"] == accuracy(mt.teacher, test) and h.final["test_acc_raw"] == accuracy(mt.model, test)
    fm = FixMatch(make_model(preset, train, 0))                      # a method without its own average gets one
    h = fit(fm, train, s, replace(preset.fit, steps=10, eval_every=10, ema_decay=0.99), test, progress=False,
            device="cpu")
    assert fm.ema_model is not None and "test_acc_raw" in h.final


@pytest.mark.parametrize("cls", [PiModel, MeanTeacher])
def test_default_dropout_works_on_a_model_without_dropout_and_leaves_the_users_model_alone(digits, cls):
    "Regression: with their default dropout both raised on torchvision's resnet18, and both set model.dropout.p in place."
    from torchvision.models import resnet18
    train, test = digits
    s = split(train.labels, 20, seed=0)
    net = resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    with pytest.warns(UserWarning, match="no `dropout` layer"):
        method = cls(net)
    cfg = replace(get_preset("tiny").fit, steps=2, eval_every=2, batch_size=8, mu=1)
    fit(method, train, s, cfg, test, progress=False, device="cpu")       # trains: no error
    ours = make_model(get_preset("tiny"), train, 0)
    assert ours.dropout.p == 0.0
    m = cls(ours)
    seen = []
    ours.dropout.register_forward_hook(lambda mod, i, o: seen.append(mod.p))
    fit(m, train, s, cfg, progress=False, device="cpu")
    assert 0.2 in seen and ours.dropout.p == 0.0                        # 0.2 inside the step, 0.0 afterwards
