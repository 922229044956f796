"Chapter 7: NT-Xent against NumPy and lightly, alignment and uniformity, the SimCLR method, its recipes, STL-10, and SimCLR's outcome."
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_book.augment import Augmenter
from ssl_book.data import UNLABELED, load_dataset, make_synthetic, split
from ssl_book.evaluate import linear_probe
from ssl_book.experiment import make_model, run_checkpoint, run_experiment
from ssl_book.models import small_cnn
from ssl_book.presets import get_preset
from ssl_book.recipes import RECIPES, FineTune, with_new_head
from ssl_book.simclr import (SimCLR, SimCLRNet, alignment, contrastive_accuracy, knn_eval, nt_xent, projection_head,
                             register_temperatures, simclr_net, simclr_recipe, uniformity)
from ssl_book.train import METHODS, fit


def _nt_xent_numpy(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    "NT-Xent in float64 from the formula: for each of the 2N anchors, -log softmax over the other 2N - 1 of its partner."
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / tau
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        others = np.delete(s[i], i)
        m = others.max()
        total += -s[i, (i + n2 // 2) % n2] + m + np.log(np.exp(others - m).sum())
    return total / n2

@pytest.mark.parametrize("n, d, tau", [(1, 3, 0.5), (2, 2, 0.1), (7, 5, 0.2), (16, 8, 0.5), (32, 64, 1.0), (9, 4, 5.0)])
def test_nt_xent_matches_numpy(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)
    ref = _nt_xent_numpy(z1.double().numpy(), z2.double().numpy(), tau)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(ref, rel=1e-5, abs=1e-6)

@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_nt_xent_matches_lightly(tau):
    "lightly is an optional, test-only reference: `pip install --no-deps lightly` (its declared dependencies are heavy)."
    loss = pytest.importorskip("lightly.loss", reason="lightly is not installed (optional test-only reference)")
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(loss.NTXentLoss(temperature=tau)(z1, z2).item(), rel=1e-5)

def test_nt_xent_invariances():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    ref = nt_xent(z1, z2, 0.3)
    perm = torch.randperm(12, generator=g)
    assert torch.allclose(nt_xent(z1[perm], z2[perm], 0.3), ref, atol=1e-6)        # pairs permuted together
    assert torch.allclose(nt_xent(z2, z1, 0.3), ref, atol=1e-6)                    # views swapped
    assert torch.allclose(nt_xent(5 * z1, 0.1 * z2, 0.3), ref, atol=1e-6)          # lengths do not matter
    assert not torch.allclose(nt_xent(z1[perm], z2, 0.3), ref, atol=1e-3)          # but the pairing does

def test_nt_xent_minimum_when_pairs_coincide_and_images_are_orthogonal():
    n, tau = 6, 0.4
    eye = torch.eye(n)
    best = nt_xent(eye, eye, tau).item()
    assert best == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / tau)), rel=1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):                                    # random embeddings, and pairs that coincide at random
        a = torch.randn(n, n, generator=g)
        assert nt_xent(a, torch.randn(n, n, generator=g), tau).item() > best
        assert nt_xent(a.abs(), a.abs(), tau).item() >= best - 1e-6                # no anti-correlated negatives
    for eps in (0.05, 0.3, 1.0):                            # a positive pulled away from its partner costs
        moved = eye.clone(); moved[2] = eye[2] + eps * eye[4]
        assert nt_xent(eye, moved, tau).item() > best
    centred = eye - eye.mean(0)                             # a simplex: negatives at cosine -1/(N-1) do better still
    assert nt_xent(centred, centred, tau).item() < best

def test_nt_xent_gradient_float32_and_bad_input():
    z1 = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    loss = nt_xent(z1, torch.randn(4, 3, dtype=torch.bfloat16), 0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(z1.grad.float()).all()
    with pytest.raises(ValueError, match="one shape"): nt_xent(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="one shape"): nt_xent(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="one shape"): nt_xent(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="one shape"): nt_xent(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="tensors"): nt_xent(np.zeros((4, 3)), torch.zeros(4, 3))
    for bad in (0.0, -0.5, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="temperature"): nt_xent(torch.ones(4, 3), torch.ones(4, 3), bad)

def test_contrastive_accuracy_alignment_uniformity_against_definitions():
    eye = torch.eye(5)
    assert contrastive_accuracy(eye, eye).item() == 1.0
    assert contrastive_accuracy(eye, eye[[1, 2, 3, 4, 0]]).item() < 1.0
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)
    an, bn = [x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True) for x in (a, b)]
    assert alignment(a, b).item() == pytest.approx(float((np.linalg.norm(an - bn, axis=1) ** 2).mean()), rel=1e-5)
    assert alignment(a, b, alpha=1).item() == pytest.approx(float(np.linalg.norm(an - bn, axis=1).mean()), rel=1e-5)
    d2 = ((an[:, None] - an[None]) ** 2).sum(-1)
    off = ~np.eye(20, dtype=bool)
    assert uniformity(a).item() == pytest.approx(float(np.log(np.exp(-2 * d2[off]).mean())), rel=1e-5)
    assert uniformity(a, t=0.5).item() == pytest.approx(float(np.log(np.exp(-0.5 * d2[off]).mean())), rel=1e-5)
    with pytest.raises(ValueError, match="N >= 2"): uniformity(torch.ones(1, 3))
    with pytest.raises(ValueError, match="one shape"): alignment(a, b[:3])


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(n_per_class=40, n_classes=4, size=8, seed=0), make_synthetic(n_per_class=10, n_classes=4, size=8, seed=1)

def test_simclr_net_shares_encoder_and_head_and_checks_its_input():
    base = small_cnn(3, 4, 8)
    net = simclr_net(base, proj_dim=16)
    assert isinstance(net, SimCLRNet) and net.encoder is base.encoder and net.head is base.head
    x = torch.rand(5, 3, 8, 8)
    assert net.project(x).shape == (5, 16) and net(x).shape == (5, 4)
    assert [type(m) for m in projection_head(8, 4, 2)] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [type(m) for m in projection_head(8, batch_norm=False)] == [nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(ValueError, match="encoder"): simclr_net(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="temperature"): SimCLR(small_cnn(3, 4, 8), temperature=0)
    with pytest.raises(ValueError, match="color"): SimCLR(small_cnn(3, 4, 8), color="sepia")
    with pytest.raises(ValueError, match="scale"): SimCLR(small_cnn(3, 4, 8), crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="knn_k"): SimCLR(small_cnn(3, 4, 8), knn_k=0)

# The online probe is the toolkit's `Pretext.probe_step`, shared with Chapter 8: tests/test_rotnet.py checks that it
# leaves the encoder untouched for SimCLR, RotNet and Jigsaw alike.

def test_the_offline_probes_leave_the_encoder_untouched(syn):
    train, test = syn
    s = split(train.labels, 40, seed=0)
    model = with_new_head(simclr_net(small_cnn(3, 4, 8)), 4)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    cfg = replace(get_preset("tiny").fit, steps=10, eval_every=10)
    fit(FineTune(model, freeze_encoder=True), train, s, cfg, test, progress=False, device="cpu")
    linear_probe(model, train.subset(s.labeled), test, epochs=5)
    knn_eval(model, train.subset(s.labeled), test)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())

class _Spy(SimCLR):
    "Records what each step received."
    def training_step(self, batch):
        self.seen = getattr(self, "seen", []) + [(batch.y is None, len(batch.x), batch.u is None)]
        return super().training_step(batch)

def test_simclr_trains_in_fit_and_logs_its_monitors(syn):
    train, test = syn
    s = split(train.labels, 20, seed=0)
    cfg = replace(get_preset("tiny").fit, steps=6, eval_every=3, batch_size=8, mu=2)
    m = _Spy(small_cnn(3, 4, 8), proj_dim=8)
    h = fit(m, train, s, cfg, test, progress=False, device="cpu")
    for key in ("contrastive", "c_acc", "align", "uniform", "probe_loss", "probe_acc", "knn_acc", "test_acc"):
        assert key in h.final and math.isfinite(h.final[key]), key
    assert m.seen[0] == (False, 8, False)                     # labeled x with labels for the probe, unlabeled u
    free = _Spy(small_cnn(3, 4, 8), probe=False)
    h = fit(free, train, s, replace(cfg, batch_size=24), test, progress=False, device="cpu")
    assert free.seen[0] == (True, 24, True)                   # label-free: no labels, one pool
    assert "test_acc" not in h.final and "knn_acc" in h.final and "probe_loss" not in h.final
    assert SimCLR(small_cnn(3, 4, 8)).settings()["crop_scale"] == [0.2, 1.0]

def test_joint_and_split_batchnorm_differ_only_in_the_statistics(syn):
    train, _ = syn
    x = train.images[:12]
    torch.manual_seed(0)
    joint = SimCLR(small_cnn(3, 4, 8))
    split_bn = SimCLR(small_cnn(3, 4, 8), joint_bn=False)
    split_bn.model.load_state_dict(joint.model.state_dict())
    for m in (joint, split_bn): m.model.train()
    lj, _ = joint.contrastive_step(x, Augmenter(1))
    ls, _ = split_bn.contrastive_step(x, Augmenter(1))
    assert not torch.allclose(lj, ls)
    for m in (joint, split_bn): m.model.eval()                # in eval mode, BatchNorm uses running statistics: same
    assert torch.allclose(joint.contrastive_step(x, Augmenter(1))[0], split_bn.contrastive_step(x, Augmenter(1))[0], atol=1e-5)

def test_registered_methods_and_recipes(syn, tmp_path):
    preset = get_preset("tiny")
    assert "simclr" in METHODS and {"simclr_probe", "simclr_finetune"} <= set(RECIPES)
    r = RECIPES["simclr_finetune"](preset)
    assert [st.name for st in r.stages] == ["pretrain", "finetune"] and r.budgets(300) == [200, 100]
    assert r.stages[0].config == {"batch_size": 32 * 4}
    assert RECIPES["simclr_probe"](preset).stages[1].name == "probe"
    assert repr(r.identity()) != repr(RECIPES["simclr_probe"](preset).identity())
    with pytest.raises(ValueError, match="pretrain_share"): simclr_recipe(preset, pretrain_share=1.0)
    names = register_temperatures((0.05, 0.1, 0.5, 1.0))
    assert names == ["simclr_probe_t0_05", "simclr_probe_t0_1", "simclr_probe_t0_5", "simclr_probe_t1"]
    from ssl_book.recipes import StageContext
    t01 = RECIPES["simclr_probe_t0_1"](preset)
    pre = t01.stages[0].build(StageContext(None, lambda: small_cnn(3, 4, 8), preset))
    assert pre.temperature == 0.1 and not pre.probe and [st.name for st in t01.stages] == ["pretrain", "probe"]
    assert repr(t01.identity()) != repr(RECIPES["simclr_probe"](preset).identity())       # another pretraining
    # at the default temperature the stages are simclr_probe's, so the two share their pretraining
    assert repr(RECIPES["simclr_probe_t0_5"](preset).identity()) == repr(RECIPES["simclr_probe"](preset).identity())
    paths = {run_checkpoint(tmp_path, {"preset": "tiny", "method": n, "labels": 50, "seed": 0, "run_id": "x"}) for n in names}
    assert len(paths) == 4                                     # distinct checkpoint files (no dot in the names)

def test_the_finetune_stage_gets_the_encoder_without_the_projection_head(syn):
    train, test = syn
    s = split(train.labels, 20, seed=0)
    preset = replace(get_preset("tiny"), fit=replace(get_preset("tiny").fit, steps=6, eval_every=3, batch_size=8, mu=1))
    from ssl_book.recipes import fit_recipe
    res = fit_recipe(simclr_recipe(preset), lambda: small_cnn(3, 4, 8), train, s, preset.fit, test, device="cpu", progress=False)
    pre, tuned = res.methods[0].model, res.method.model
    ema = res.methods[0].ema_model.encoder
    # a copy of the pretraining stage's EMA encoder: the same network, and the pretrained weights stay in the result
    assert not hasattr(tuned, "projector") and tuned.encoder is not ema and tuned.encoder.state_dict().keys() == ema.state_dict().keys()
    assert tuned.head is not pre.head and "test_acc" in res.history.final


# STL-10: never downloaded in tests; an image-folder copy is read like any folder.
def _fake_stl(root, classes):
    from PIL import Image
    g = np.random.default_rng(0)
    img = lambda p: (p.parent.mkdir(parents=True, exist_ok=True), Image.fromarray(g.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(p))
    for c in classes:
        for i in range(2):
            img(root / "train" / c / f"{i}.png"); img(root / "test" / c / f"{i}.png")
    for i in range(5): img(root / "unlabeled" / f"{i}.png")

def test_stl10_from_an_image_folder_and_without_download(tmp_path):
    from ssl_book.data import STL10_CLASSES
    with pytest.raises(ValueError, match="download=False"):
        load_dataset("stl10", root=tmp_path / "nothing", download=False)
    _fake_stl(tmp_path / "stl10", STL10_CLASSES)
    train, test = load_dataset("stl10", root=tmp_path)
    assert train.classes == STL10_CLASSES and len(train) == 25 and len(test) == 20
    assert (train.labels == UNLABELED).sum() == 5 and train.images.shape[1:] == (3, 12, 12)
    small, _ = load_dataset("stl10", root=tmp_path, image_size=6)
    assert small.images.shape[1:] == (3, 6, 6)
    _fake_stl(tmp_path / "other" / "stl10", ["a", "b"])
    with pytest.raises(ValueError, match="STL-10 class folders"):
        load_dataset("stl10", root=tmp_path / "other")


@pytest.mark.slow
def test_simclr_encoder_beats_a_random_one_and_fine_tuning_beats_supervised_on_digits(digits):
    """Learning outcomes (tiny preset, seeds 0-2). (1) At every seed the pretrained encoder (EMA) beats the random encoder
    it started from by >= 15 points in kNN accuracy and in offline linear-probe accuracy (67 of 450 test images; measured
    gains: 25 to 40 points). (2) simclr_finetune beats supervised training from scratch by >= 1.5 points on average over
    the three seeds (measured: +2.67; per seed +4.89, +3.11, +0.00)."""
    train, test = digits
    preset = get_preset("tiny")
    recs = run_experiment(preset, ["supervised", "simclr_finetune"], seeds=[0, 1, 2], data=digits, device="cpu")
    by = {(r["method"], r["seed"]): 100 * r["test_acc"] for r in recs}
    gains = [by["simclr_finetune", s_] - by["supervised", s_] for s_ in (0, 1, 2)]
    assert np.mean(gains) >= 1.5, gains
    for seed in (0, 1, 2):
        s = split(train.labels, preset.n_labeled, preset.n_unlabeled, preset.n_val, seed=seed)
        lab = train.subset(s.labeled)
        m = SimCLR(make_model(preset, train, seed))
        fit(m, train, s, replace(preset.fit, seed=seed), test, progress=False, device="cpu")
        rand = make_model(preset, train, seed)
        knn = (100 * knn_eval(rand, lab, test), 100 * knn_eval(m.ema_model, lab, test))
        probe = (100 * linear_probe(rand, lab, test), 100 * linear_probe(m.ema_model, lab, test))
        assert knn[1] >= knn[0] + 15 and probe[1] >= probe[0] + 15, (seed, knn, probe)
