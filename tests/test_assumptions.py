"ssl_book.assumptions: graph methods against scikit-learn, bad input, and the measures of Chapter 2."
import numpy as np
import pytest
from sklearn.semi_supervised import LabelPropagation, LabelSpreading

from ssl_book.assumptions import (class_mismatch_curve, compare_on_digits, entropy, graph_affinity, graph_geodesics,
                                  graph_predict, label_propagation, label_spreading, neighbour_purity, propagation_step,
                                  smoothness_gap, spreading_matrix)

def _data(seed, n=80, d=3, k=3, n_lab=9):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.full(n, -1)
    lab = rng.choice(n, n_lab, replace=False)
    y[lab] = np.arange(n_lab) % k
    return X, y

def _same_predictions(pred, ref):
    "Predictions agree wherever the reference has a clear winner (exact ties may break either way)."
    top2 = np.sort(ref.label_distributions_, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-9
    return (pred[clear] == ref.transduction_[clear]).all()

CASES = [dict(kernel="rbf", gamma=20), dict(kernel="rbf", gamma=0.5), dict(kernel="knn", n_neighbors=7),
         dict(kernel="knn", n_neighbors=3)]

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("params", CASES, ids=lambda p: "-".join(map(str, p.values())))
def test_label_propagation_matches_sklearn(seed, params):
    X, y = _data(seed)
    ref = LabelPropagation(**params, max_iter=1000, tol=1e-3).fit(X, y)
    F, pred = label_propagation(X, y, **params, max_iter=1000, tol=1e-3)
    assert np.abs(F - ref.label_distributions_).max() < 1e-6
    assert _same_predictions(pred, ref)

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha", [0.2, 0.8])
@pytest.mark.parametrize("params", CASES, ids=lambda p: "-".join(map(str, p.values())))
def test_label_spreading_matches_sklearn(seed, alpha, params):
    X, y = _data(seed)
    ref = LabelSpreading(**params, alpha=alpha, max_iter=30, tol=1e-3).fit(X, y)
    F, pred = label_spreading(X, y, **params, alpha=alpha, max_iter=30, tol=1e-3)
    assert np.abs(F - ref.label_distributions_).max() < 1e-6
    assert _same_predictions(pred, ref)

def test_iteration_cap_matches_sklearn():
    X, y = _data(3)
    ref = LabelPropagation(kernel="rbf", gamma=2, max_iter=3, tol=1e-12).fit(X, y)
    F, _ = label_propagation(X, y, kernel="rbf", gamma=2, max_iter=3, tol=1e-12)
    assert np.abs(F - ref.label_distributions_).max() < 1e-6

def test_graph_predict_matches_sklearn_inductive():
    X, y = _data(4)
    Xn = np.random.default_rng(9).normal(size=(10, 3))
    ref = LabelSpreading(kernel="rbf", gamma=0.5).fit(X, y)
    F, _ = label_spreading(X, y, kernel="rbf", gamma=0.5)
    assert np.abs(graph_predict(X, F, Xn, "rbf", 0.5) - ref.predict_proba(Xn)).max() < 1e-6

def test_propagation_step_clamps_and_normalises():
    X, _ = _data(5, n=10)
    T = graph_affinity(X, "rbf", gamma=1.0); T /= T.sum(1, keepdims=True)
    Y0 = np.zeros((10, 2)); Y0[0, 0] = Y0[1, 1] = 1
    lab = np.zeros(10, bool); lab[:2] = True
    F = propagation_step(np.random.default_rng(0).random((10, 2)), T, Y0, lab)
    assert np.allclose(F[:2], Y0[:2]) and np.allclose(F.sum(1), 1)

def test_spreading_matrix_symmetric_for_symmetric_graph():
    X, _ = _data(6, n=20)
    S = spreading_matrix(graph_affinity(X, "rbf", gamma=1.0))
    assert np.allclose(S, S.T) and np.allclose(np.diag(S), 0)
    assert np.abs(np.linalg.eigvalsh(S)).max() <= 1 + 1e-9          # spectral radius <= 1: the iteration converges

@pytest.mark.parametrize("call, msg", [
    (lambda X, y: label_spreading(X, np.full(len(y), -1)), "no labeled point"),
    (lambda X, y: label_spreading(X, np.where(y == 1, 2, y)), r"class\(es\) \[1\]"),
    (lambda X, y: label_propagation(X, y[:-1]), "give one label"),
    (lambda X, y: label_spreading(X, y, alpha=1.0), "strictly between 0 and 1"),
    (lambda X, y: label_spreading(X, y, alpha=0.0), "strictly between 0 and 1"),
    (lambda X, y: label_spreading(X, y.astype(float)), "integer"),
    (lambda X, y: label_propagation(X, y, kernel="cosine"), "unknown kernel"),
    (lambda X, y: label_propagation(X[:, 0], y), "2-D array"),
])
def test_bad_input(call, msg):
    X, y = _data(7)
    with pytest.raises(ValueError, match=msg):
        call(X, y)

def test_entropy_properties():
    import torch
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    h = entropy(p)
    assert h[0] == 0 and torch.isclose(h[1], torch.log(torch.tensor(2.0)))

def test_smoothness_gap_constant_vs_jumpy():
    X = np.random.default_rng(0).normal(size=(100, 2))
    const = lambda x: np.tile([0.3, 0.7], (len(x), 1))
    stripes = lambda x: np.eye(2)[(np.floor(x[:, 0] * 20) % 2).astype(int)]   # flips every 0.05
    assert smoothness_gap(const, X, 0.1) == 0
    assert smoothness_gap(stripes, X, 0.1) > 0.3
    with pytest.raises(ValueError): smoothness_gap(const, X, -1)

def test_graph_geodesics_follow_a_curve():
    t = np.linspace(0, 3 * np.pi, 300)
    X = np.c_[np.cos(t), np.sin(t), 0.1 * t]                              # a helix: arc length is known
    geo = graph_geodesics(X, 0, n_neighbors=4)
    arc = t * np.sqrt(1 + 0.01)
    assert np.allclose(geo, arc, rtol=0.02, atol=0.02)

def test_class_mismatch_curve_small_and_bad_pool():
    out = class_mismatch_curve(shares=(0.0, 1.0), seeds=(0,), pool=100)
    assert len(out["spreading"]) == 2 and out["spreading"][0][1] == 0.0   # one seed: std 0, not NaN
    assert out["spreading"][1][0] < out["spreading"][0][0]                 # foreign digits hurt
    with pytest.raises(ValueError, match="pool must be"):
        class_mismatch_curve(pool=10_000)

def test_label_spreading_beats_supervised_on_digits():
    "The chapter's learning claim: with 10 labels per class, the graph beats 1-NN and logistic regression."
    res = compare_on_digits(seeds=(0, 1))
    ours = np.mean(res["label spreading (kNN graph)"])
    assert ours > np.mean(res["1-NN"]) + 0.02 and ours > np.mean(res["logistic regression"]) + 0.02

def test_neighbour_purity_extremes():
    X = np.concatenate([np.zeros((10, 2)), np.full((10, 2), 100.0)]) + np.random.default_rng(0).normal(size=(20, 2))
    y = np.repeat([0, 1], 10)
    assert neighbour_purity(X, y, k=5) == 1.0
    assert neighbour_purity(X, np.tile([0, 1], 10), k=9) < 0.6
