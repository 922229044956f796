"Chapter 4: Lee's schedule, thresholded pseudo-labels, selection rules, self-training rounds, reliability bins."
from dataclasses import replace

import numpy as np
import pytest
from conftest import train_registered_on_tiny
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_book.augment import Augmenter
from ssl_book.data import split
from ssl_book.evaluate import expected_calibration_error
from ssl_book.experiment import make_model
from ssl_book.presets import get_preset
from ssl_book.pseudo_labels import (PseudoLabel, SelfTraining, lee_alpha, lee_steps, reliability_bins,
                                    select_pseudo_labels)
from ssl_book.train import METHODS, Batch, fit

MARGIN = 2.0      # points by which a method must beat supervised on every seed (tiny preset, digits)

@pytest.mark.parametrize("t, want", [(0, 0.0), (99, 0.0), (100, 0.0), (350, 1.5), (600, 3.0), (10**4, 3.0)])
def test_lee_alpha_golden_values(t, want):
    assert lee_alpha(t) == want

def test_lee_alpha_is_continuous_and_monotone():
    a = [lee_alpha(t, 10, 20, 2.0) for t in np.linspace(0, 30, 301)]
    assert all(y >= x for x, y in zip(a, a[1:]))
    assert abs(lee_alpha(20 - 1e-9, 10, 20, 2.0) - 2.0) < 1e-6

def test_lee_steps_scale_with_the_preset():
    assert lee_steps(get_preset("cpu")) == (200, 1200)
    assert lee_steps(get_preset("tiny")) == (30, 180)

class Fixed(nn.Module):
    "A 'model' that returns given logits for the unlabeled rows and learnable ones for the labeled rows."
    def __init__(self, n_lab: int, unl_logits: torch.Tensor):
        super().__init__()
        self.lab = nn.Parameter(torch.zeros(n_lab, unl_logits.shape[1]))
        self.unl = nn.Parameter(unl_logits.clone())
    def forward(self, x):
        return torch.cat([self.lab, self.unl])[: len(x)]

def _batch(n_lab, n_unl, step, u_y=None):
    return Batch(torch.rand(n_lab, 1, 4, 4), torch.zeros(n_lab, dtype=torch.long), torch.rand(n_unl, 1, 4, 4), u_y,
                 Augmenter(0, flip=False, pad_frac=0.0), step)

def test_pseudo_label_loss_masks_and_weights_by_hand():
    unl = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.97, 0.03]]))
    model = Fixed(2, unl)
    pl = PseudoLabel(model, tau=0.85, t1=10, t2=20, alpha_f=3.0)
    loss, logs = pl.training_step(_batch(2, 4, step=15, u_y=torch.tensor([0, 0, 0, 0])))
    sup = F.cross_entropy(model.lab, torch.zeros(2, dtype=torch.long))
    kept = torch.tensor([-np.log(0.9), 0.0, 0.0, -np.log(0.97)], dtype=torch.float)   # only 0.9 and 0.97 pass
    assert torch.isclose(loss, sup + 1.5 * kept.sum() / 4, atol=1e-6)
    assert logs["mask"].item() == 0.5
    assert logs["masked_correct"].item() == 0.5 and logs["pseudo_acc_all"].item() == 0.75

def test_pseudo_label_gradient_treats_the_label_as_a_constant():
    unl = torch.tensor([[2.0, 0.0, -1.0]])
    model = Fixed(1, unl)
    loss, _ = PseudoLabel(model, tau=0.0, t1=0, t2=1, alpha_f=1.0).training_step(_batch(1, 1, step=5))
    loss.backward()
    p = unl.softmax(1)
    assert torch.allclose(model.unl.grad, p - F.one_hot(torch.tensor([0]), 3))        # d CE / dz = p - e_label

def test_lee_weight_is_zero_before_t1():
    model = Fixed(2, torch.randn(3, 4))
    loss, logs = PseudoLabel(model, 0.0, t1=10, t2=20).training_step(_batch(2, 3, step=9))
    assert logs["alpha"].item() == 0.0
    assert torch.isclose(loss, logs["sup"])

def _numpy_select(probs, tau=None, per_class=None):
    conf, lab = probs.max(1), probs.argmax(1)
    if tau is not None:
        idx = np.flatnonzero(conf >= tau)
    else:
        idx = []
        for c in range(probs.shape[1]):
            rows = np.flatnonzero(lab == c)
            idx += list(rows[np.argsort(-conf[rows], kind="stable")[:per_class]])
        idx = np.sort(np.array(idx, dtype=int))
    return idx, lab[idx]

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_against_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(500, 6, generator=g)).softmax(1)
    for kwargs in [dict(tau=0.0), dict(tau=0.5), dict(tau=0.95), dict(tau=1.0), dict(per_class=1), dict(per_class=20),
                   dict(per_class=10**6)]:
        idx, lab = select_pseudo_labels(probs, **kwargs)
        want_idx, want_lab = _numpy_select(probs.numpy(), **kwargs)
        assert idx.tolist() == want_idx.tolist() and lab.tolist() == want_lab.tolist(), kwargs

def test_class_balanced_selection_caps_every_class():
    probs = torch.tensor([[0.9, 0.1]] * 8 + [[0.2, 0.8]] * 2)
    idx, lab = select_pseudo_labels(probs, per_class=3)
    assert torch.bincount(lab).tolist() == [3, 2]

class Linear(nn.Module):
    "A fixed linear classifier on the mean pixel of each of two halves of the image."
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[8.0, -8.0], [-8.0, 8.0]]))
    def forward(self, x):
        h = x.shape[-1] // 2
        f = torch.stack([x[..., :h].mean((1, 2, 3)), x[..., h:].mean((1, 2, 3))], 1)
        return f @ self.w

def _pool(n=40):
    "Images whose left or right half is bright: class 0 or 1; every fifth label is flipped (hidden truth)."
    from ssl_book.data import ImageSet
    g = torch.Generator().manual_seed(0)
    side = torch.arange(n) % 2
    x = torch.randint(0, 60, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    for i in range(n):
        x[i, :, :, 2 * side[i]: 2 * side[i] + 2] += 150
    y = side.clone()
    y[::5] = 1 - y[::5]
    return ImageSet(x, y, ["left", "right"], source="test pool")

def test_self_training_relabels_at_round_boundaries_and_measures_with_hidden_labels():
    train = _pool()
    from ssl_book.data import Split
    s = Split(torch.arange(4), torch.arange(4, 40), torch.arange(0))
    st = SelfTraining(Linear(), round_steps=3, tau=0.0)
    st.setup(train, s, torch.device("cpu"))
    for step in range(7):
        st.training_step(Batch(train.images[:4], train.labels[:4], train.images[4:10], None,
                               Augmenter(step, flip=False, pad_frac=0.0), step))
    assert [r["step"] for r in st.rounds] == [3, 6]                     # not at step 0, once per boundary
    pred = (torch.arange(4, 40) % 2)                                     # the fixed model predicts the bright side
    truth = train.labels[4:40]
    assert abs(st.rounds[0]["pl_acc"] - (pred == truth).float().mean().item()) < 1e-6
    assert st.rounds[0]["selected"] == 1.0
    assert st.rounds[1]["kept_errors"] == 1.0                            # a fixed model keeps every mistake
    assert st.labels.tolist() == pred.tolist()

def test_self_training_trains_only_on_selected_pool_images_with_their_pseudo_labels():
    train = _pool()
    from ssl_book.data import Split
    s = Split(torch.arange(4), torch.arange(4, 40), torch.arange(0))
    model = Linear()
    st = SelfTraining(model, round_steps=1, tau=0.999)
    st.setup(train, s, torch.device("cpu"))
    seen = {}
    def spy(x):
        seen["x"] = x
        return Linear.forward(model, x)
    model.forward = spy
    st.training_step(Batch(train.images[:4], train.labels[:4], train.images[4:12], None, Augmenter(0, False, 0.0), 1))
    conf = Linear()(train.images[4:40].float() / 255).softmax(1).max(1).values
    assert len(st.idx) == int((conf >= 0.999).sum()) and len(seen["x"]) == 4 + 8
    chosen = {tuple(img.flatten().tolist()) for img in train.images[4:40][st.idx]}
    assert all(tuple((255 * im).round().flatten().tolist()) in chosen for im in seen["x"][4:])   # only selected ones

def test_self_training_state_round_trip():
    train = _pool()
    from ssl_book.data import Split
    s = Split(torch.arange(4), torch.arange(4, 40), torch.arange(0))
    a = SelfTraining(Linear(), round_steps=1, per_class=5)
    a.setup(train, s, torch.device("cpu"))
    a.relabel(1)
    b = SelfTraining(Linear(), round_steps=1, per_class=5)
    b.load_state_dict(a.state_dict())
    assert b.idx.tolist() == a.idx.tolist() and b.rounds == a.rounds and len(a.idx) == 10

@pytest.mark.parametrize("seed", [0, 1])
def test_reliability_bins_reproduce_the_toolkit_ece(seed):
    g = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(400, 5, generator=g)).softmax(1)
    labels = torch.randint(0, 5, (400,), generator=g)
    r = reliability_bins(probs, labels, 15)
    assert r["count"].sum() == 400
    ece = (r["count"] / 400 * (r["accuracy"] - r["confidence"]).abs()).nansum().item()
    assert abs(ece - expected_calibration_error(probs, labels, 15)) < 1e-6

@pytest.mark.parametrize("call", [
    lambda: lee_alpha(0, t1=600, t2=100),
    lambda: lee_alpha(0, t1=100, t2=100),
    lambda: lee_alpha(0, alpha_f=-1.0),
    lambda: PseudoLabel(nn.Linear(2, 2), tau=-0.1),
    lambda: PseudoLabel(nn.Linear(2, 2), tau=1.1),
    lambda: PseudoLabel(nn.Linear(2, 2), t1=50, t2=10),
    lambda: select_pseudo_labels(torch.rand(5, 3), tau=1.5),
    lambda: select_pseudo_labels(torch.rand(5, 3), tau=-0.5),
    lambda: select_pseudo_labels(torch.rand(5, 3)),
    lambda: select_pseudo_labels(torch.rand(5, 3), tau=0.5, per_class=2),
    lambda: select_pseudo_labels(torch.rand(5, 3), per_class=0),
    lambda: select_pseudo_labels(torch.rand(5), tau=0.5),
    lambda: SelfTraining(nn.Linear(2, 2), round_steps=0),
    lambda: SelfTraining(nn.Linear(2, 2), round_steps=5, tau=2.0),
    lambda: SelfTraining(nn.Linear(2, 2), round_steps=5, lam=-1.0),
    lambda: SelfTraining(nn.Linear(2, 2), round_steps=5, tau=0.3, per_class=5),
    lambda: SelfTraining(nn.Linear(2, 2), round_steps=5, per_class=0),
    lambda: reliability_bins(torch.rand(5, 3), torch.zeros(4, dtype=torch.long)),
    lambda: reliability_bins(torch.rand(5, 3), torch.zeros(5, dtype=torch.long), n_bins=0),
])
def test_bad_input_is_a_value_error(call):
    with pytest.raises(ValueError):
        call()

@pytest.fixture(scope="module")
def tiny_runs(digits):
    "Supervised, thresholded pseudo-labels and self-training on the tiny preset, seeds 0-2, same split per seed."
    return train_registered_on_tiny(digits, ("supervised", "pseudo_label", "self_training"))

@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholded_pseudo_labels_beat_supervised_on_digits(tiny_runs, seed):
    base = 100 * tiny_runs["supervised", seed].final["test_acc"]
    acc = 100 * tiny_runs["pseudo_label", seed].final["test_acc"]
    assert acc >= base + MARGIN, f"pseudo_label {acc:.2f}% vs supervised {base:.2f}% (seed {seed})"

@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_training_is_not_worse_than_supervised_on_digits(tiny_runs, seed):
    base = 100 * tiny_runs["supervised", seed].final["test_acc"]
    assert 100 * tiny_runs["self_training", seed].final["test_acc"] >= base, seed

def test_bench_prints_pseudo_label_rows(tmp_path, capsys):
    from ssl_book.cli import main
    names = ["supervised", "pseudo_label", "self_training"]
    assert main(["bench", "--preset", "tiny", "--methods", *names, "--seeds", "0", "--steps", "20",
                 "--out", str(tmp_path)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.split()[:1]]
    assert all(n in rows for n in names), rows

def test_self_training_setup_starts_fresh():
    train = _pool()
    from ssl_book.data import Split
    s = Split(torch.arange(4), torch.arange(4, 40), torch.arange(0))
    st = SelfTraining(Linear(), round_steps=1)
    st.setup(train, s, torch.device("cpu"))
    st.relabel(1)
    st.setup(train, s, torch.device("cpu"))                                # a second fit on the same object
    assert st.rounds == [] and st.idx is None

def test_self_training_resumes_bit_exactly_mid_round(digits, tmp_path):
    train, _ = digits
    preset = get_preset("tiny")
    s = split(train.labels, preset.n_labeled, preset.n_unlabeled, preset.n_val, seed=0)
    cfg = replace(preset.fit, seed=0, steps=16, eval_every=4)
    make = lambda seed: SelfTraining(make_model(preset, train, seed), round_steps=6, tau=0.5)
    whole = make(0)
    fit(whole, train, s, cfg, progress=False, device="cpu")
    crashing = make(0)
    orig = crashing.training_step
    def step_or_crash(batch):
        if batch.step == 10: raise KeyboardInterrupt                     # after the checkpoint of step 8, mid-round
        return orig(batch)
    crashing.training_step = step_or_crash
    with pytest.raises(KeyboardInterrupt):
        fit(crashing, train, s, cfg, progress=False, device="cpu", checkpoint=tmp_path / "st.pt")
    resumed = make(1)
    fit(resumed, train, s, cfg, progress=False, device="cpu", checkpoint=tmp_path / "st.pt")
    assert [r["step"] for r in resumed.rounds] == [r["step"] for r in whole.rounds] == [6, 12]
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()))
