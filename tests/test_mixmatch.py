"ssl_book.mixmatch: sharpen and the order of averaging, MixUp, interleave, the loss by hand, bad input, and learning outcomes."
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from ssl_book.augment import Augmenter
from ssl_book.data import split
from ssl_book.experiment import make_model
from ssl_book.mixmatch import MixMatch, guess_labels, interleave, mix_lambda, mixmatch_for, mixup, sharpen
from ssl_book.presets import get_preset
from ssl_book.train import METHODS, Batch, fit

def test_sharpen_against_numpy():
    p = np.random.default_rng(0).dirichlet(np.ones(7), size=50)
    for T in (0.25, 0.5, 1.0, 2.0):
        ref = p ** (1 / T); ref /= ref.sum(1, keepdims=True)
        assert np.allclose(sharpen(torch.tensor(p), T).numpy(), ref, atol=1e-6)
    one_hot = torch.eye(3)
    assert torch.equal(sharpen(one_hot, 0.1), one_hot)

class _Fixed(nn.Module):
    "Returns stored logits for each view, identified by its first value."
    def __init__(self, table): super().__init__(); self.table = table
    def forward(self, x): return self.table[int(x[0, 0])]

def test_guess_averages_then_sharpens():
    # two views whose predictions disagree: averaging first gives a flat guess; sharpening first would not
    p1, p2 = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.2, 0.8]])
    model = _Fixed({0: p1.log(), 1: p2.log()})
    views = [torch.zeros(1, 1), torch.ones(1, 1)]
    got = guess_labels(model, views, T=0.5)
    right = sharpen((p1 + p2) / 2, 0.5)                              # (0.55, 0.45) -> (0.599, 0.401)
    wrong = (sharpen(p1, 0.5) + sharpen(p2, 0.5)) / 2                # (0.529, 0.471)... a different answer
    assert torch.allclose(got, right, atol=1e-6) and not torch.allclose(got, wrong, atol=1e-3)
    assert got[0, 0].item() == pytest.approx(0.55 ** 2 / (0.55 ** 2 + 0.45 ** 2), abs=1e-6)

def test_guess_has_no_gradient():
    model = nn.Linear(4, 3)
    q = guess_labels(model, [torch.randn(5, 4), torch.randn(5, 4)], 0.5)
    assert not q.requires_grad and torch.allclose(q.sum(1), torch.ones(5))

def test_mix_lambda_is_at_least_half():
    torch.manual_seed(0)
    lams = [mix_lambda(0.75) for _ in range(500)]
    assert all(0.5 <= l <= 1 for l in lams) and np.std(lams) > 0.05

def test_mixup_is_a_convex_combination():
    x1, x2 = torch.rand(6, 3, 4, 4), torch.rand(6, 3, 4, 4)
    y1, y2 = torch.eye(6)[:, :5], torch.rand(6, 5).softmax(1)
    xm, ym = mixup(x1, y1, x2, y2, 0.7)
    assert torch.allclose(xm, 0.7 * x1 + 0.3 * x2) and torch.allclose(ym, 0.7 * y1 + 0.3 * y2)
    assert (xm >= torch.minimum(x1, x2) - 1e-7).all() and (xm <= torch.maximum(x1, x2) + 1e-7).all()

@pytest.mark.parametrize("parts,batch", [(2, 8), (3, 64), (5, 64), (4, 7)])
def test_interleave_is_an_involution_and_mixes(parts, batch):
    xy = [torch.full((batch, 2), float(i)) for i in range(parts)]
    once = interleave(xy, batch)
    assert all(len(t) == batch for t in once)
    assert all(torch.equal(a, b) for a, b in zip(interleave(once, batch), xy))
    assert set(once[0][:, 0].tolist()) == set(range(parts))         # the first sub-batch holds every part

def test_mixmatch_loss_by_hand_without_mixup():
    "K = 1, no MixUp, no sharpening: the losses reduce to CE on x and the squared error to the guessed softmax."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    mm = MixMatch(model, T=1.0, K=1, lambda_u=2.0, rampup=0, ema_decay=None, use_sharpen=False, use_mixup=False,
                  use_interleave=False)
    x, y, u = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]), torch.rand(4, 1, 2, 2)
    aug = Augmenter(0, flip=False, pad_frac=0.0)                     # no randomness left in weak views
    loss, logs = mm.training_step(Batch(x, y, u, None, aug, step=5))
    with torch.no_grad():
        q = model(u).softmax(1)
        sup = nn.functional.cross_entropy(model(x), y)
        unsup = ((model(u).softmax(1) - q) ** 2).mean()
    assert logs["sup"].item() == pytest.approx(sup.item(), abs=1e-6) and logs["unsup"].item() == pytest.approx(0, abs=1e-9)
    assert loss.item() == pytest.approx(sup.item() + 2.0 * unsup.item(), abs=1e-6)

def test_no_gradient_into_guessed_labels():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    mm = MixMatch(model, K=2, rampup=0, ema_decay=None)          # full weight at step 0
    seen = {}
    orig = mm._forward_in_chunks
    def spy(x, b):
        seen["x"] = x
        return orig(x, b)
    mm._forward_in_chunks = spy
    torch.manual_seed(1)
    loss, _ = mm.training_step(Batch(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]), torch.rand(8, 1, 2, 2), None,
                                     Augmenter(0, flip=False, pad_frac=0.0), step=0))
    loss.backward()
    assert not seen["x"].requires_grad                               # inputs and targets are constants
    assert all(p.grad is not None for p in model.parameters())

def test_lambda_u_ramps_linearly():
    assert MixMatch(nn.Linear(2, 2), ema_decay=None).rampup == 16_000               # the paper's ramp by default
    mm = MixMatch(nn.Linear(2, 2), lambda_u=75, rampup=100, ema_decay=None)
    assert [mm.weight(t) for t in (0, 50, 100, 1000)] == [0.0, 37.5, 75.0, 75.0]

def test_mixmatch_for_keeps_the_papers_lambda_u_only_where_its_ramp_fits():
    "gpu: the paper's 75 over 16,000 steps; cpu and tiny: 25 over 30% of the run (75 collapsed there); overrides win."
    net = nn.Linear(2, 2)
    got = {name: (mixmatch_for(net, get_preset(name)).lambda_u, mixmatch_for(net, get_preset(name)).rampup)
           for name in ("tiny", "cpu", "gpu")}
    assert got == {"tiny": (25.0, 90), "cpu": (25.0, 600), "gpu": (75.0, 16_000)}
    assert mixmatch_for(net, get_preset("cpu"), lambda_u=75.0).lambda_u == 75.0

@pytest.mark.parametrize("call", [
    lambda: sharpen(torch.ones(2, 2), 0.0),
    lambda: guess_labels(nn.Linear(2, 2), [], 0.5),
    lambda: guess_labels(nn.Linear(2, 2), [torch.zeros(2, 2), torch.zeros(3, 2)], 0.5),
    lambda: mix_lambda(0.0),
    lambda: mixup(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3, 3), torch.zeros(3, 4), 0.5),
    lambda: mixup(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 5), 0.5),
    lambda: interleave([torch.zeros(4, 1), torch.zeros(3, 1)], 4),
    lambda: MixMatch(nn.Linear(2, 2), T=-1),
    lambda: MixMatch(nn.Linear(2, 2), K=0),
    lambda: MixMatch(nn.Linear(2, 2), alpha=0),
    lambda: MixMatch(nn.Linear(2, 2), ema_decay=1.0),
    lambda: MixMatch(nn.Linear(2, 2), ema_decay=-0.1),
    lambda: mixup(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0.5, 0.5, 0.5])),
    lambda: mixup(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 4), 1.5),
])
def test_bad_input_is_a_value_error(call):
    with pytest.raises(ValueError):
        call()

@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixmatch_beats_supervised_on_digits(digits, seed):
    train, test = digits
    preset = get_preset("tiny")
    s = split(train.labels, preset.n_labeled, preset.n_unlabeled, preset.n_val, seed=seed)
    acc = {}
    for name in ("supervised", "mixmatch"):
        h = fit(METHODS[name](make_model(preset, train, seed), preset), train, s, replace(preset.fit, seed=seed), test,
                progress=False, device="cpu")
        acc[name] = 100 * h.final["test_acc"]
    assert acc["mixmatch"] >= acc["supervised"] + 2.0, acc

def test_mixmatch_loss_by_hand_with_mixup_and_sharpening(monkeypatch):
    "The full loss on fixed tensors: targets built by hand (one-hot, sharpened average), mixed, then scored."
    import ssl_book.mixmatch as mmod
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    seen = {}
    real = mmod.mixup
    monkeypatch.setattr(mmod, "mixup", lambda *a: (seen.update(args=a), real(*a))[1])
    monkeypatch.setattr(mmod, "mix_lambda", lambda alpha, n=None: torch.linspace(0.5, 1.0, n))
    mm = MixMatch(model, T=0.5, K=2, lambda_u=3.0, rampup=0, ema_decay=None, use_interleave=False)
    x, y, u = torch.rand(2, 1, 2, 2), torch.tensor([0, 2]), torch.rand(4, 1, 2, 2)
    aug = Augmenter(0, flip=False, pad_frac=0.0)                     # weak views equal the images
    loss, logs = mm.training_step(Batch(x, y, u, None, aug, step=10))
    x1, y1, x2, y2, lam = seen["args"]
    with torch.no_grad():
        q = sharpen(model(u).softmax(1), 0.5)                        # the average of two identical views
        want_y1 = torch.cat([nn.functional.one_hot(y, 3).float(), q, q])
        assert torch.allclose(y1, want_y1, atol=1e-6) and torch.equal(lam, torch.linspace(0.5, 1.0, 10))
        assert sorted(map(tuple, x2.flatten(1).tolist())) == sorted(map(tuple, x1.flatten(1).tolist()))  # one shuffled pool
        l = lam[:, None]                                              # one lam' per example
        xm, ym = l[:, :, None, None] * x1 + (1 - l[:, :, None, None]) * x2, l * y1 + (1 - l) * y2
        p = model(xm).softmax(1)
        sup = -(ym[:2] * p[:2].log()).sum(1).mean()
        unsup = ((p[2:] - ym[2:]) ** 2).mean()
    assert unsup.item() > 1e-4                                        # a case where the unlabeled term matters
    assert loss.item() == pytest.approx(sup.item() + 3.0 * unsup.item(), rel=1e-5)
    # Gradients: the method's must equal those of the hand loss with constant (detached) targets.
    assert not y1.requires_grad and not y2.requires_grad
    loss.backward()
    got = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    p = model(xm).softmax(1)
    (-(ym[:2] * p[:2].log()).sum(1).mean() + 3.0 * ((p[2:] - ym[2:]) ** 2).mean()).backward()
    assert all(torch.allclose(a, q.grad, atol=1e-6) for a, q in zip(got, model.parameters()))

def test_interleave_does_not_change_the_loss_without_batchnorm():
    "Interleaving permutes rows between sub-batches and back: without BatchNorm, the loss must be the same."
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    batch = lambda: Batch(torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0]),
                          torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(1)), None,
                          Augmenter(0, flip=False, pad_frac=0.0), step=3)
    losses = []
    for inter in (True, False):
        torch.manual_seed(5)
        mm = MixMatch(model, K=2, rampup=0, ema_decay=None, use_interleave=inter)
        losses.append(mm.training_step(batch())[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

def test_per_example_lambda_mixes_each_row_with_its_own_weight():
    x1, x2 = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    y1, y2 = torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[0.0, 1.0]] * 3)
    lam = torch.tensor([0.5, 0.8, 1.0])
    xm, ym = mixup(x1, y1, x2, y2, lam)
    assert torch.allclose(xm[:, 0, 0, 0], 1 - lam) and torch.allclose(ym[:, 0], lam)
    draws = mix_lambda(0.75, 1000)
    assert draws.shape == (1000,) and draws.min() >= 0.5 and draws.std() > 0.05     # one draw per example

def _crash_at(method, step: int):
    "Make `method` raise at `step`, as if the process died there (after the checkpoint of an earlier step)."
    orig = method.training_step
    def step_or_crash(batch):
        if batch.step == step: raise KeyboardInterrupt
        return orig(batch)
    method.training_step = step_or_crash
    return method

def test_mixmatch_resumes_bit_exactly(digits, tmp_path):
    train, _ = digits
    preset = get_preset("tiny")
    s = split(train.labels, preset.n_labeled, preset.n_unlabeled, preset.n_val, seed=0)
    cfg = replace(preset.fit, seed=0, steps=12, eval_every=4)
    whole = mixmatch_for(make_model(preset, train, 0), preset)
    fit(whole, train, s, cfg, progress=False, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        fit(_crash_at(mixmatch_for(make_model(preset, train, 0), preset), 9), train, s, cfg, progress=False,
            device="cpu", checkpoint=tmp_path / "run.pt")
    resumed = mixmatch_for(make_model(preset, train, 1), preset)       # other initial weights: the checkpoint wins
    fit(resumed, train, s, cfg, progress=False, device="cpu", checkpoint=tmp_path / "run.pt")
    for a, b in zip(list(whole.ema.state_dict().values()) + list(whole.model.state_dict().values()),
                    list(resumed.ema.state_dict().values()) + list(resumed.model.state_dict().values())):
        assert torch.equal(a, b)
