"ssl_book.evaluate: metrics against independent computations; the frozen probe."
import copy
import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.neighbors import KNeighborsClassifier

from ssl_book.data import make_synthetic, to_unit
from ssl_book.evaluate import (accuracy, confusion_matrix, eval_batch_size, expected_calibration_error, extract_features,
                               knn_accuracy, linear_probe, per_class_accuracy, predict)
from ssl_book.models import small_cnn

def _ece_numpy(probs, labels, n_bins):
    "An independent ECE: loop over bins with numpy's digitize on right-closed bins."
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any(): total += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return total

def test_ece_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 5)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 5, 500)
    ours = expected_calibration_error(torch.tensor(probs, dtype=torch.float64), torch.tensor(labels), n_bins=10)
    assert abs(ours - _ece_numpy(probs, labels, 10)) < 1e-6

def test_ece_zero_for_perfectly_calibrated_and_bad_input():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0
    assert expected_calibration_error(probs, torch.tensor([1, 0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        expected_calibration_error(torch.rand(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="3 probability rows but 2 labels"):
        expected_calibration_error(torch.rand(3, 2), torch.tensor([0, 1]))

def test_confusion_and_per_class_against_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    cm = confusion_matrix(torch.tensor(p), torch.tensor(y), 4)
    assert (cm.numpy() == sk_confusion(y, p, labels=range(4))).all()
    pca = per_class_accuracy(torch.tensor(p), torch.tensor(y), 4)
    assert np.allclose(pca.numpy(), [(p[y == c] == c).mean() for c in range(4)])
    with pytest.raises(ValueError, match="0..3"):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)

def test_knn_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g)
    ytr, yte = torch.randint(0, 3, (200,), generator=g), torch.randint(0, 3, (80,), generator=g)
    ftr = centers[ytr] + 0.8 * torch.randn(200, 8, generator=g)
    fte = centers[yte] + 0.8 * torch.randn(80, 8, generator=g)
    ref = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(ftr.numpy(), ytr.numpy())
    ours = knn_accuracy(ftr, ytr, fte, yte, k=5)
    assert ours == pytest.approx((ref.predict(fte.numpy()) == yte.numpy()).mean(), abs=1 / 80 + 1e-9)
    assert ours > 0.6
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(ftr, ytr, fte, yte, k=0)
    with pytest.raises(ValueError, match="one label per row"):
        knn_accuracy(ftr, ytr[:-1], fte, yte, k=5)

def test_predict_restores_training_mode():
    m = small_cnn(width=4, n_classes=4).train()
    data = make_synthetic(n_per_class=5)
    predict(m, data.images)
    assert m.training
    m.eval(); accuracy(m, data)
    assert not m.training

def test_predict_does_not_depend_on_the_batch_size():
    "Eval mode computes every image on its own: the batch size (CPU default 128) changes the speed, not the logits."
    torch.manual_seed(0)
    m = small_cnn(width=8, n_classes=4).train()
    m(torch.rand(16, 3, 32, 32))                       # BatchNorm statistics away from their initial values
    data = make_synthetic(n_per_class=40)
    ref = torch.cat([m.eval()(to_unit(data.images[i:i + 1])) for i in range(len(data))]).detach()   # one at a time
    for bs in (None, 1, 7, 128, 1024):
        assert torch.allclose(predict(m, data.images, batch_size=bs), ref, atol=1e-5), bs
    assert eval_batch_size("cpu") == 128 and eval_batch_size("cuda") == 1024
    sizes = []                                         # the default is what predict uses: batches of 128 at most
    predict(m, torch.zeros(300, 3, 32, 32, dtype=torch.uint8), fn=lambda net, x: (sizes.append(len(x)), net(x))[1])
    assert sizes == [128, 128, 44]
    with pytest.raises(ValueError, match="batch_size must be"):
        predict(m, data.images, batch_size=0)

def test_linear_probe_keeps_backbone_frozen_and_batchnorm_untouched():
    data = make_synthetic(n_per_class=40, seed=2)
    train, test = data.subset(range(120)), data.subset(range(120, 160))
    m = small_cnn(width=8, n_classes=4).train()
    before = copy.deepcopy(m.state_dict())
    acc = linear_probe(m, train, test, epochs=50)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)        # weights and BN running stats
    assert m.training                                                   # mode restored
    assert all(p.grad is None for p in m.parameters())                  # no gradient reached the backbone
    assert acc > 0.5                                                    # random conv features separate the classes

def test_extract_features_shape():
    m = small_cnn(width=4, n_classes=4)
    assert extract_features(m, make_synthetic(n_per_class=3).images).shape == (12, 16)
