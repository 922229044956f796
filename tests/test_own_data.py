"Practitioners' data: folder and CSV layouts with unlabeled images, sizes, clear errors, any model, save and predict."
import csv, os, re, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_book.data as data_module
from ssl_book.data import UNLABELED, ImageSet, given_split, load_dataset, split
from ssl_book.models import Normalize, build_model, load_model, save_model, wrap
from ssl_book.train import FitConfig, Supervised, fit

ROOT = Path(__file__).resolve().parents[1]

def _img(path: Path, w: int = 12, h: int = 12, value: int | None = None, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = np.full((h, w, 3), value, np.uint8) if value is not None else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)

def _folder(root: Path, classes=("cat", "dog"), n=6, n_unl=8, n_test=3, sizes=((12, 12),), test=True):
    "root/train/<class>/, root/unlabeled/ (nested), root/test/<class>/; class c is bright (c+1) * 60 on average."
    k = 0
    for c, name in enumerate(classes):
        for i in range(n):
            w, h = sizes[k % len(sizes)]; k += 1
            _img(root / "train" / name / f"{i}.png", w, h, value=60 * (c + 1) + i)
        if test:
            for i in range(n_test): _img(root / "test" / name / f"{i}.png", 12, 12, value=60 * (c + 1) + i)
    for i in range(n_unl):
        _img(root / "unlabeled" / ("a" if i % 2 else "b/c") / f"u{i}.jpg", 12, 12, value=60 * (i % len(classes) + 1))
    return root

def test_train_unlabeled_and_test_folders(tmp_path):
    root = _folder(tmp_path / "data")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    train, test = load_dataset("folder", root=root)
    assert train.classes == ["cat", "dog"] and len(train) == 12 + 8 and len(test) == 6
    assert (train.labels == UNLABELED).sum() == 8 and train.labels[:12].tolist() == [0] * 6 + [1] * 6
    s = given_split(train)
    assert s.labeled.tolist() == list(range(12)) and s.unlabeled.tolist() == list(range(12, 20)) and len(s.val) == 0
    v = given_split(train, n_val=2, seed=0)
    assert len(v.labeled) == 10 and len(v.val) == 2 and train.labels[v.val].tolist() == [0, 1]
    assert "without a label" in repr(train)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before     # nothing beside the data
    with pytest.raises(ValueError, match="given_split"): split(train.labels, 4)

def test_without_a_test_folder_the_labeled_images_lend_a_stratified_share(tmp_path):
    train, test = load_dataset("folder", root=_folder(tmp_path / "d", n=10, test=False))
    assert len(test) == 4 and test.labels.bincount().tolist() == [2, 2] and (test.labels != UNLABELED).all()
    assert (train.labels == UNLABELED).sum() == 8 and (train.labels != UNLABELED).sum() == 16

def test_csv_layout(tmp_path):
    root = tmp_path / "d"
    for i in range(4): _img(root / "imgs" / f"{i}.png", value=50 * i)
    _img(root / "unlabeled" / "x.png")
    (root / "labels.csv").write_text("path,label\nimgs/0.png,b\nimgs/1.png,a\nimgs/2.png,\nimgs/3.png,a\n")
    for c in ("a", "b"): _img(root / "test" / c / "t.png")
    train, test = load_dataset("folder", root=root)
    assert train.classes == ["a", "b"] and train.labels.tolist() == [1, 0, UNLABELED, 0, UNLABELED]
    assert int(train.images[1].float().mean()) == 50 and len(test) == 2
    (root / "labels.csv").write_text("imgs/0.png,b\nimgs/9.png,a\n")
    with pytest.raises(ValueError, match=r"line 2: .*imgs/9.png does not exist"): load_dataset("folder", root=root)
    (root / "labels.csv").write_text(",a\n")
    with pytest.raises(ValueError, match="line 1: no path"): load_dataset("folder", root=root)

def test_mixed_sizes_need_image_size_and_are_covered_then_cropped(tmp_path):
    root = _folder(tmp_path / "d", sizes=((12, 12), (20, 10)))
    with pytest.raises(ValueError, match=r"different sizes: .*is 20x10.*image_size"): load_dataset("folder", root=root)
    train, test = load_dataset("folder", root=root, image_size=8)
    assert train.images.shape[1:] == (3, 8, 8) and test.images.shape[1:] == (3, 8, 8)
    # the rule: a 20x10 image (left half 0, right half 200) covers 8x8 at 16x8, and its centre crop spans both halves
    a = np.zeros((10, 20, 3), np.uint8); a[:, 10:] = 200
    Image.fromarray(a).save(root / "train" / "cat" / "0.png")
    row = load_dataset("folder", root=root, image_size=8)[0].images[0, 0, 4]
    assert row[0] < 20 and row[-1] > 180 and row.tolist() == sorted(row.tolist())

def test_bad_files_are_named(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "train" / "cat" / ".DS_Store").write_text("x")             # hidden: skipped
    assert len(load_dataset("folder", root=root)[0]) == 20
    (root / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt is not an image file"): load_dataset("folder", root=root)
    (root / "train" / "cat" / "notes.txt").unlink()
    (root / "unlabeled" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png"): load_dataset("folder", root=root)
    (root / "unlabeled" / "broken.png").unlink()
    (root / "train" / "bird").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*bird has no images"): load_dataset("folder", root=root)
    (root / "train" / "bird").rmdir()
    (root / "test" / "cat").rename(root / "test" / "lion")
    with pytest.raises(ValueError, match="test/ under"): load_dataset("folder", root=root)
    only = tmp_path / "e"; _img(only / "unlabeled" / "u.png")
    with pytest.raises(ValueError, match="no train/"): load_dataset("folder", root=only)

def test_fit_on_the_given_split_logs_no_hidden_labels_and_refuses_unlabeled_in_labeled(tmp_path):
    from ssl_book.consistency import FixMatch
    train, test = load_dataset("folder", root=_folder(tmp_path / "d"))
    s = given_split(train)
    m = FixMatch(build_model("cnn", 3, 2, width=8))
    h = fit(m, train, s, FitConfig(steps=4, eval_every=4, mu=1, batch_size=4, precision="fp32"), test, progress=False)
    assert 0 <= h.final["test_acc"] <= 1
    assert all(np.isnan(v) for v in h["pl_acc"]) if "pl_acc" in h.final else True    # nothing to measure against
    bad = type(s)(torch.cat([s.labeled, s.unlabeled[:1]]), s.unlabeled[1:], s.val)
    with pytest.raises(ValueError, match="given_split"):
        fit(Supervised(build_model("cnn", 3, 2, width=8)), train, bad, FitConfig(steps=1), progress=False)

def test_wrap_normalises_for_any_model():
    from torchvision.models import resnet18
    r = resnet18(num_classes=3).eval()
    w = wrap(r, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(w(x), r((x - 0.5) / 0.25), atol=1e-5) and isinstance(w[0], Normalize)
    with pytest.raises(ValueError, match="nn.Module"): wrap(lambda x: x)

def test_save_and_load(tmp_path):
    from torchvision.models import resnet18
    m = build_model("cnn", 3, 4, width=8, mean=[0.4, 0.5, 0.6], std=[0.2, 0.2, 0.2]).eval()
    save_model(tmp_path / "m.pt", m, list("abcd"), 32)
    back, info = load_model(tmp_path / "m.pt")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(back(x), m(x)) and info["classes"] == list("abcd") and info["image_size"] == [32, 32]
    assert info["normalize"]["mean"] == pytest.approx([0.4, 0.5, 0.6])
    r = wrap(resnet18(num_classes=2)).eval()
    save_model(tmp_path / "r.pt", r, ["x", "y"], (24, 16), arch="torchvision:resnet18")
    assert torch.allclose(load_model(tmp_path / "r.pt")[0](x), r(x), atol=1e-6)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    save_model(tmp_path / "p.pt", plain, ["x", "y"], 32)
    with pytest.raises(ValueError, match="pass model="): load_model(tmp_path / "p.pt")
    assert load_model(tmp_path / "p.pt", model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2)))[1]["arch"] is None
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a model file"): load_model(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="torchvision:"): save_model(tmp_path / "q.pt", r, ["x", "y"], 8, arch="resnet18")

def test_the_readme_example_runs(tmp_path, monkeypatch):
    "The ten lines of the README's 'Your own images', as printed, on a generated folder (2 steps instead of 2,000)."
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own images", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([l for l in code.splitlines() if l.strip()]) <= 10
    assert "steps=2000" in code
    _folder(tmp_path / "my_images", sizes=((12, 12), (14, 10)))
    monkeypatch.chdir(tmp_path)
    exec(code.replace("steps=2000", "steps=2"), {})
    model, info = load_model(tmp_path / "model.pt")
    assert info["classes"] == ["cat", "dog"] and info["image_size"] == [64, 64] and info["arch"]["torchvision"] == "resnet18"

def test_cli_train_and_predict(tmp_path):
    from ssl_book.cli import main
    root = _folder(tmp_path / "d")
    model = tmp_path / "model.pt"
    assert main(["train", "--root", str(root), "--method", "fixmatch", "--preset", "tiny", "--steps", "6",
                 "-o", str(model)]) == 0
    out = tmp_path / "p.csv"
    assert main(["predict", str(model), str(root / "unlabeled"), "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 8 and {r["label"] for r in rows} <= {"cat", "dog"} and all(0 < float(r["confidence"]) <= 1 for r in rows)
    assert main(["predict", str(model), str(tmp_path / "nowhere")]) == 2
    assert main(["train", "--method", "fixmatch"]) == 2                     # --data folder needs --root

def test_python_dash_m_runs_the_command_line():
    r = subprocess.run([sys.executable, "-m", "ssl_book", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "predict" in r.stdout

def test_streaming_decodes_on_demand_and_trains_like_memory(tmp_path):
    from ssl_book.consistency import FixMatch
    from ssl_book.data import LazyImages
    root = _folder(tmp_path / "d", n=10, n_unl=20)
    mem, mem_test = load_dataset("folder", root=root)
    lazy, lazy_test = load_dataset("folder", root=root, stream=True)
    assert isinstance(lazy.images, LazyImages) and lazy.images.shape == mem.images.shape and len(lazy) == len(mem)
    view = lazy.images[torch.tensor([0, 5, 25])]
    assert isinstance(view, LazyImages) and torch.equal(view.load(), mem.images[[0, 5, 25]])
    assert torch.equal(lazy.subset([1, 2]).images.load(), mem.images[1:3]) and torch.equal(lazy.labels, mem.labels)
    cfg = FitConfig(steps=6, batch_size=4, mu=2, eval_every=3, ema_decay=0.9, precision="fp32")
    hs = []
    for data, test in ((mem, mem_test), (lazy, lazy_test)):
        torch.manual_seed(0)
        hs.append(fit(FixMatch(build_model("cnn", 3, 2, width=8)), data, given_split(data), cfg, test, progress=False))
    assert np.allclose(hs[0]["loss"], hs[1]["loss"], atol=1e-6) and hs[0]["test_acc"] == hs[1]["test_acc"]

def test_streaming_is_chosen_by_size_and_checks_sizes_from_headers(tmp_path):
    from ssl_book.data import LazyImages, load_folder
    root = _folder(tmp_path / "d", sizes=((12, 12), (20, 10)))
    assert isinstance(load_folder(root, memory_gb=1e-9, image_size=8)[0].images, LazyImages)     # too big: stream
    assert isinstance(load_folder(root, image_size=8)[0].images, torch.Tensor)                   # fits: in memory
    with pytest.raises(ValueError, match=r"different sizes: .*is 20x10"): load_folder(root, stream=True)
