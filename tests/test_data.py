"ssl_book.data: checks, loaders, the split and the sampler."
import numpy as np
import pytest
import torch
from PIL import Image

import ssl_book.data as data_module
from ssl_book.data import (ImageSet, StepSampler, check_images, check_labels, load_dataset, make_synthetic,
                           read_image_folder, split)


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, msg", [
    (torch.zeros(2, 3, 4, 4), "uint8"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), "[N, C, H, W]"),
    (np.zeros((2, 3, 4, 4), dtype=np.uint8), "torch.Tensor"),
])
def test_check_images_rejects(bad, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        check_images(bad)

@pytest.mark.parametrize("labels, msg", [
    (torch.tensor([0, 3]), "0..2"), (torch.tensor([-1, 0]), ">= 0"), (torch.tensor([0.5, 1.0]), "integer"),
    (torch.zeros(2, 2, dtype=torch.long), "1-D"),
])
def test_check_labels_rejects(labels, msg):
    with pytest.raises(ValueError, match=msg):
        check_labels(labels, n_classes=3)

def test_imageset_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        ImageSet(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])

def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="digits, cifar10, stl10, folder, synthetic"):
        load_dataset("imagenet")

def test_missing_cifar_without_download(tmp_path):
    with pytest.raises(ValueError, match="download=False"):
        load_dataset("cifar10", root=tmp_path, download=False)

def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset("folder", root=tmp_path / "nope")
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("folder")


# --- loaders -----------------------------------------------------------------------------------
def test_digits_shape_and_fixed_split(digits):
    train, test = digits
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797 and train.n_classes == 10
    assert train.images.max() == 255 and train.images.min() == 0
    again, _ = load_dataset("digits")
    assert torch.equal(again.images, train.images)                     # the train/test split is fixed
    # stratified test split: every class has 25% +- 1 of its examples in test
    full = torch.cat([train.labels, test.labels]).bincount()
    assert ((test.labels.bincount() - 0.25 * full).abs() <= 1).all()

def _write_folder(root, classes, n, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    written = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / c / f"{i:03d}.png")
            written[(c, i)] = img
    return written

def test_image_folder_roundtrip_and_cache(tmp_path):
    written = _write_folder(tmp_path / "imgs", ["cat", "dog"], 3)
    s = read_image_folder(tmp_path / "imgs")
    assert s.classes == ["cat", "dog"] and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(s.images[4], written[("dog", 1)])                # PNG is lossless
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]          # nothing written beside the user's data
    assert list((data_module.CACHE_DIR / "folders").glob("imgs-*.npz"))
    cached = read_image_folder(tmp_path / "imgs")
    assert torch.equal(cached.images, s.images) and cached.classes == s.classes

def test_folder_with_train_and_test(tmp_path):
    for part in ("train", "test"): _write_folder(tmp_path / part, ["a", "b", "c"], 4)
    train, test = load_dataset("folder", root=tmp_path)
    assert len(train) == 12 and len(test) == 12 and train.classes == ["a", "b", "c"]

def test_folder_without_split_is_split_stratified(tmp_path):
    _write_folder(tmp_path, ["a", "b"], 10)
    train, test = load_dataset("folder", root=tmp_path)
    assert len(test) == 4 and test.labels.bincount().tolist() == [2, 2] and len(train) == 16

def test_folder_split_keeps_class_shares_when_imbalanced(tmp_path):
    _write_folder(tmp_path / "big", ["many"], 40)
    _write_folder(tmp_path / "small", ["few"], 5)
    (tmp_path / "big" / "many").rename(tmp_path / "many"); (tmp_path / "small" / "few").rename(tmp_path / "few")
    (tmp_path / "big").rmdir(); (tmp_path / "small").rmdir()
    train, test = load_dataset("folder", root=tmp_path)
    assert train.labels.bincount().tolist() == [4, 32] and test.labels.bincount().tolist() == [1, 8]

def test_folder_cache_notices_added_files(tmp_path):
    _write_folder(tmp_path / "imgs", ["a", "b"], 2)
    assert len(read_image_folder(tmp_path / "imgs")) == 4
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "imgs" / "a" / "new.png")
    assert len(read_image_folder(tmp_path / "imgs")) == 5                 # not the stale cache

def test_folder_cache_notices_a_replaced_image_with_the_same_count(tmp_path):
    "Regression: the cache returned the old arrays when an image was replaced by another and the count stayed."
    _write_folder(tmp_path / "imgs", ["a", "b"], 2)
    before = read_image_folder(tmp_path / "imgs")
    victim = sorted((tmp_path / "imgs" / "a").iterdir())[0]
    Image.fromarray(np.full((6, 6, 3), 7, np.uint8)).save(victim)
    after = read_image_folder(tmp_path / "imgs")
    assert len(after) == len(before) and (after.images[0] == 7).all() and not torch.equal(after.images, before.images)

def test_cifar_layout_folder_is_found(tmp_path, monkeypatch):
    from ssl_book.data import CIFAR10_CLASSES
    for part in ("train", "test"): _write_folder(tmp_path / "cifar10-jpeg" / part, CIFAR10_CLASSES, 1, size=4)
    monkeypatch.setenv("SSL_BOOK_DATA", str(tmp_path))
    train, test = load_dataset("cifar10", download=False)
    assert train.classes == CIFAR10_CLASSES and len(train) == 10 and train.images.shape[1:] == (3, 4, 4)

def test_sources_name_the_data(digits):
    assert digits[0].source == "scikit-learn digits" and digits[0].subset([0, 1]).source == "scikit-learn digits"
    assert make_synthetic().source == "synthetic"

def test_to_unit_copies_and_checks():
    from ssl_book.data import to_unit
    u = torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)
    assert torch.equal(to_unit(u), torch.ones(1, 1, 2, 2)) and u.dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8"): to_unit(torch.ones(1, 1, 2, 2))

def test_synthetic_is_learnable_signal():
    s = make_synthetic(n_per_class=50, n_classes=3)
    means = torch.stack([s.images[s.labels == c].float().mean(0) for c in range(3)])
    assert (means[0] - means[1]).abs().mean() > 10                       # classes differ on average


# --- the split ---------------------------------------------------------------------------------
def test_split_stratified_disjoint_and_complete(digits):
    y = digits[0].labels
    s = split(y, n_labeled=40, n_val=100, seed=1)
    lab, unl, val = (set(t.tolist()) for t in (s.labeled, s.unlabeled, s.val))
    assert not (lab & unl) and not (lab & val) and not (unl & val)
    assert len(lab | unl | val) == len(y)                                # the default unlabeled set is the rest
    assert y[s.labeled].bincount().tolist() == [4] * 10
    assert y[s.val].bincount().tolist() == [10] * 10

def test_split_remainder_goes_to_some_classes(digits):
    counts = digits[0].labels[split(digits[0].labels, 25, seed=0).labeled].bincount()
    assert counts.sum() == 25 and set(counts.tolist()) == {2, 3}

def test_split_same_seed_same_split_other_seed_differs(digits):
    y = digits[0].labels
    a, b, c = split(y, 50, seed=7), split(y, 50, seed=7), split(y, 50, seed=8)
    assert torch.equal(a.labeled, b.labeled) and torch.equal(a.unlabeled, b.unlabeled)
    assert not torch.equal(a.labeled, c.labeled)

def test_split_nested_over_label_counts(digits):
    y = digits[0].labels
    sets = [set(split(y, n, seed=3).labeled.tolist()) for n in (10, 50, 200)]
    assert sets[0] <= sets[1] <= sets[2]

def test_split_n_unlabeled_is_stratified_subsample(digits):
    y = digits[0].labels
    s = split(y, 20, n_unlabeled=500, seed=0)
    assert len(s.unlabeled) == 500 and not set(s.unlabeled.tolist()) & set(s.labeled.tolist())
    share = y[s.unlabeled].bincount().float() / 500
    assert (share - y.bincount().float() / len(y)).abs().max() < 0.01

def test_split_tiny_unlabeled_set(digits):
    s = split(digits[0].labels, 20, n_unlabeled=3, seed=0)               # fewer than one per class
    assert len(s.unlabeled) == 3 and not set(s.unlabeled.tolist()) & set(s.labeled.tolist())

def test_split_all_labels(digits):
    y = digits[0].labels
    s = split(y, len(y), seed=0)
    assert len(s.labeled) == len(y) and len(s.unlabeled) == 0

@pytest.mark.parametrize("kwargs, msg", [
    (dict(n_labeled=5), "at least one labeled"),
    (dict(n_labeled=2000), "exceeds"),
    (dict(n_labeled=1340), "examples but"),                              # an even share too big for a class
    (dict(n_labeled=20, n_unlabeled=5000), "n_unlabeled"),
    (dict(n_labeled=20, n_val=-1), ">= 0"),
    (dict(n_labeled=20.0), "integer"),
])
def test_split_impossible_sizes(digits, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        split(digits[0].labels, **kwargs)


# --- the sampler -------------------------------------------------------------------------------
def test_sampler_is_a_function_of_seed_and_step():
    idx = torch.arange(100, 137)
    a, b = StepSampler(idx, 10, seed=4), StepSampler(idx, 10, seed=4)
    seq = [a.batch(t) for t in range(12)]
    assert all(torch.equal(b.batch(t), seq[t]) for t in reversed(range(12)))   # any order, same batches
    assert not torch.equal(StepSampler(idx, 10, seed=5).batch(0), seq[0])

def test_sampler_covers_each_epoch_exactly_once():
    idx = torch.arange(37)
    s = StepSampler(idx, 10, seed=0)
    stream = torch.cat([s.batch(t) for t in range(37)])                 # 370 = 10 epochs of 37
    for e in range(10):
        assert sorted(stream[37 * e: 37 * (e + 1)].tolist()) == list(range(37))

def test_sampler_batch_larger_than_set():
    b = StepSampler(torch.tensor([3, 5]), 5, seed=0).batch(0)
    assert len(b) == 5 and set(b.tolist()) == {3, 5}

def test_sampler_rejects_empty():
    with pytest.raises(ValueError): StepSampler(torch.tensor([], dtype=torch.long), 4)


def test_split_when_a_class_has_one_unlabeled_example_left():
    "Regression: scikit-learn's stratified subsample raised its own error when a class had one example in the rest."
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    s = split(labels, n_labeled=6, n_unlabeled=10, seed=0)          # class 2: 2 labeled, 1 left over
    assert len(s.unlabeled) == 10 and not set(s.unlabeled.tolist()) & set(s.labeled.tolist())
    counts = labels[s.unlabeled].bincount(minlength=3).tolist()
    assert sum(counts) == 10 and max(abs(c - q) for c, q in zip(counts, [8 * 10 / 17, 8 * 10 / 17, 10 / 17])) < 1
    assert torch.equal(split(labels, 6, 10, seed=0).unlabeled, s.unlabeled)          # still seeded

def test_split_digest_names_the_split():
    labels = torch.arange(40) % 4
    a, b = split(labels, 8, seed=0), split(labels, 8, seed=1)
    assert a.digest() == split(labels, 8, seed=0).digest() and a.digest() != b.digest() and len(a.digest()) == 12
