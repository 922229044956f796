"CIFAR-10-C (ssl_book.corruptions): fidelity against the reference outputs, the data set files, the metrics, bad input."
import hashlib, io, json, os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from ssl_book.corruptions import (ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, RANDOM_CORRUPTIONS, SEVERITIES,
                                  corrupt, corrupt_batch, corruption_accuracy, frost_textures, hsv2rgb, job_seed,
                                  load_cifar10c, make_cifar10c, mce, motion_kernel, relative_mce, rgb2hsv, zoom_crop,
                                  _frost_ok)
from conftest import ROOT

GOLDEN = Path(os.environ.get("SSL_BOOK_GOLDEN", ROOT.parent / "shared" / "golden" / "cifar10c"))
needs_golden = pytest.mark.skipif(not (GOLDEN / "golden.npz").exists(),
                                  reason=f"no CIFAR-10-C reference data at {GOLDEN} (set SSL_BOOK_GOLDEN)")
DETERMINISTIC = [c for c in ALL_CORRUPTIONS if c not in RANDOM_CORRUPTIONS]

def _small(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)

# ---------------------------------------------------------------- fidelity against the reference generator

@pytest.fixture(scope="module")
def golden():
    return (np.load(GOLDEN / "fixtures.npz")["images"], np.load(GOLDEN / "golden.npz"),
            np.load(GOLDEN / "golden_float.npz"))

@needs_golden
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_fixtures_match_reference(golden, name):
    "np.random.seed(1234) before each call, as the reference: at most 1 level off on < 1% of values (README §7)."
    fixtures, gold, _ = golden
    for s in SEVERITIES:
        ours = np.stack([corrupt(f, name, s, rng=np.random.RandomState(1234)) for f in fixtures])
        d = np.abs(ours.astype(int) - gold[f"{name}/{s}"].astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 0.01, (name, s, int(d.max()), float((d > 0).mean()))

@needs_golden
@pytest.mark.parametrize("name", [c for c in ALL_CORRUPTIONS if c not in ("motion_blur", "pixelate", "jpeg_compression")])
def test_float_stage_matches_reference(golden, name):
    "Before the uint8 cast: the same library routines, so within 1e-9 of the reference's floats."
    from ssl_book import corruptions as C
    fixtures, _, gold_float = golden
    for s in SEVERITIES:
        ours = np.concatenate([getattr(C, name)(f[None], s, np.random.RandomState(1234)) for f in fixtures])
        assert np.abs(ours.astype(np.float64) - gold_float[f"{name}/{s}"]).max() <= 1e-9, (name, s)

@pytest.fixture(scope="module")
def sample():
    "The 200 CIFAR-10 test images of stats.json, decoded with Pillow, and the statistics."
    z = np.load(GOLDEN / "stats_inputs.npz")
    jb, off = z["jpeg_bytes"], z["offsets"]
    clean = np.stack([np.asarray(Image.open(io.BytesIO(jb[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                      for i in range(len(off) - 1)])
    stats = json.loads((GOLDEN / "stats.json").read_text())
    assert hashlib.sha256(clean.tobytes()).hexdigest() == stats["clean"]["sha256_uint8"]
    return clean, stats

@needs_golden
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_sample_identical_with_legacy_draws(sample, name):
    "Seed once, carry the state from image to image (README §6): the reference's 200 outputs, hashed."
    clean, stats = sample
    for s in SEVERITIES:
        out = corrupt_batch(clean, name, s, seed=np.random.RandomState(1234), chunk=64)
        assert hashlib.sha256(out.tobytes()).hexdigest() == stats["stats"][name][str(s)]["sha256_uint8_seed1234"], s

@needs_golden
@pytest.mark.parametrize("name", RANDOM_CORRUPTIONS)
def test_generator_draws_match_statistics(sample, name):
    "A numpy Generator draws other numbers from the same distributions: mad, mean, std, frac_changed within tolerance."
    clean, stats = sample
    c = clean.astype(np.float64)
    for s in SEVERITIES:
        out = corrupt_batch(clean, name, s, seed=np.random.default_rng([7, s]))
        o = out.astype(np.float64)
        got = {"mad": np.abs(o - c).mean(), "mean": o.mean(), "std": o.std(), "frac_changed": (out != clean).mean()}
        ref = stats["stats"][name][str(s)]
        for k, v in got.items():
            assert abs(v - ref[k]) <= ref["tolerance"][k], (name, s, k, v, ref[k], ref["tolerance"][k])

# ---------------------------------------------------------------- properties and independent oracles

@pytest.mark.parametrize("z", [1.0, 1.01, 1.06, 1.13, 1.2, 1.25, 1.75, 2.25])
def test_zoom_crop_is_scipy_zoom(z):
    x = np.random.default_rng(0).random((3, 32, 32, 2)).astype(np.float32)
    h, ch = 32, int(np.ceil(32 / z))
    top = (h - ch) // 2
    ref = ndimage.zoom(x[:, top:top + ch, top:top + ch], (1, z, z, 1), order=1)
    trim = (ref.shape[1] - h) // 2
    assert np.array_equal(zoom_crop(x, z), ref[:, trim:trim + h, trim:trim + h])

def test_hsv_round_trip_and_matplotlib_oracle():
    from matplotlib.colors import rgb_to_hsv
    rgb = np.random.default_rng(0).random((500, 3))
    rgb[:50] = rgb[:50, :1]                                    # greys: hue and saturation 0
    assert np.allclose(rgb2hsv(rgb), rgb_to_hsv(rgb), atol=1e-12)
    assert np.allclose(hsv2rgb(rgb2hsv(rgb)), rgb, atol=1e-12)

def test_motion_kernel_is_one_sided_along_the_angle():
    w, dy, dx = motion_kernel(6, 2, 0.0)
    assert len(w) == 13 and np.isclose(w.sum(), 1) and np.all(np.diff(w) < 0)
    assert np.array_equal(dx, np.arange(13)) and not dy.any()
    _, dy, dx = motion_kernel(6, 2, 90.0)
    assert np.array_equal(dy, np.arange(13)) and not dx.any()

def test_frost_textures_have_the_reference_sizes():
    assert [t.shape for t in frost_textures()] == [(120, 180, 3), (63, 112, 3), (63, 112, 3), (70, 105, 3), (99, 132, 3)]

def test_frost_checksums_are_checked(tmp_path):
    assert not _frost_ok(tmp_path)
    for f in ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]: (tmp_path / f).write_bytes(b"x")
    assert not _frost_ok(tmp_path)

@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_every_corruption_runs_and_keeps_shape(name):
    x = _small(3)
    for s in SEVERITIES:
        y = corrupt_batch(x, name, s, seed=0)
        assert y.shape == x.shape and y.dtype == np.uint8

@pytest.mark.parametrize("name", RANDOM_CORRUPTIONS)
def test_same_seed_same_output_other_seed_other_output(name):
    x = _small(4)
    a, b, c = (corrupt_batch(x, name, 3, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(corrupt(x[0], name, 3, rng=5), corrupt(x[0], name, 3, rng=np.random.default_rng(5)))

@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_ignore_the_seed(name):
    x = _small(2)
    assert np.array_equal(corrupt_batch(x, name, 2, seed=0), corrupt_batch(x, name, 2, seed=1))

def test_batch_equals_one_by_one_with_a_carried_stream():
    x = _small(5)
    batch = corrupt_batch(x, "snow", 4, seed=np.random.RandomState(3), chunk=2)
    rs = np.random.RandomState(3)
    assert np.array_equal(batch, np.stack([corrupt(xi, "snow", 4, rng=rs) for xi in x]))

def test_severity_makes_noise_stronger():
    x = _small(8)
    mad = [np.abs(corrupt_batch(x // 2 + 64, "gaussian_noise", s).astype(int) - (x // 2 + 64)).mean() for s in SEVERITIES]
    assert np.all(np.diff(mad) > 0)

# ---------------------------------------------------------------- bad input

def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown corruption 'rain'") as e:
        corrupt(_small(1)[0], "rain", 1)
    assert all(n in str(e.value) for n in ALL_CORRUPTIONS)

@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True, "3"])
def test_severity_outside_1_to_5(severity):
    with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
        corrupt(_small(1)[0], "contrast", severity)

@pytest.mark.parametrize("bad, match", [
    (np.zeros((32, 32, 3), np.float32), "dtype uint8"),
    (np.zeros((32, 32), np.uint8), "shape"),
    (np.zeros((28, 28, 3), np.uint8), "shape"),
    (np.zeros((3, 32, 32), np.uint8), "shape"),
    (np.zeros((1, 32, 32, 3), np.uint8), "shape"),
    (torch.zeros(32, 32, 3, dtype=torch.uint8), "numpy array"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        corrupt(bad, "fog", 1)

def test_bad_batch_and_rng():
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        corrupt_batch(np.zeros((32, 32, 3), np.uint8), "fog", 1)
    with pytest.raises(ValueError, match="rng must be"):
        corrupt(_small(1)[0], "fog", 1, rng="seed")
    with pytest.raises(ValueError, match="labels"):
        make_cifar10c(_small(3), [0, 1], "/nonexistent/never")

# ---------------------------------------------------------------- the data set files

def test_make_cifar10c_layout(tmp_path):
    x, y = _small(6), np.arange(6) % 3
    make_cifar10c(x, y, tmp_path, corruptions=["gaussian_noise", "pixelate"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gaussian_noise.npy", "labels.npy", "manifest.json", "pixelate.npy"]
    data = np.load(tmp_path / "gaussian_noise.npy")
    assert data.shape == (30, 32, 32, 3) and data.dtype == np.uint8
    assert np.array_equal(np.load(tmp_path / "labels.npy"), np.tile(y, 5))
    for s in SEVERITIES:                                       # severity-major blocks of N images
        assert np.array_equal(data[(s - 1) * 6:s * 6], corrupt_batch(x, "gaussian_noise", s, seed=job_seed(0, "gaussian_noise", s)))
        imgs, labs = load_cifar10c(tmp_path, "gaussian_noise", s)
        assert np.array_equal(imgs, data[(s - 1) * 6:s * 6]) and np.array_equal(labs, y)

def test_make_cifar10c_resumes_and_repairs(tmp_path):
    x, y = _small(4), np.arange(4)
    make_cifar10c(x, y, tmp_path, corruptions=["fog", "contrast"], severities=(1, 3), progress=False)
    fog = tmp_path / "fog.npy"
    before = fog.stat().st_mtime_ns, (tmp_path / "contrast.npy").read_bytes()
    make_cifar10c(x, y, tmp_path, corruptions=["fog", "contrast", "snow"], severities=(1, 3), progress=False)
    assert fog.stat().st_mtime_ns == before[0]                # verified and skipped
    assert (tmp_path / "snow.npy").exists()
    damaged = bytearray((tmp_path / "contrast.npy").read_bytes()); damaged[-1] ^= 0xFF
    (tmp_path / "contrast.npy").write_bytes(bytes(damaged))
    make_cifar10c(x, y, tmp_path, corruptions=["contrast"], severities=(1, 3), progress=False)
    assert (tmp_path / "contrast.npy").read_bytes() == before[1]   # the damaged file was rewritten
    imgs, _ = load_cifar10c(tmp_path, "fog", 3)
    assert np.array_equal(imgs, np.load(fog)[4:])
    with pytest.raises(ValueError, match="severities"):
        load_cifar10c(tmp_path, "fog", 2)
    make_cifar10c(x[::-1].copy(), y, tmp_path, corruptions=["fog"], severities=(1, 3), progress=False)
    assert fog.stat().st_mtime_ns != before[0]                # other inputs: written again

def test_workers_give_the_same_files(tmp_path):
    x, y = _small(5), np.arange(5)
    make_cifar10c(x, y, tmp_path / "a", corruptions=["shot_noise", "frost"], severities=(2, 5), progress=False)
    make_cifar10c(x, y, tmp_path / "b", corruptions=["shot_noise", "frost"], severities=(2, 5), workers=2, progress=False)
    for n in ["shot_noise", "frost"]:
        assert np.array_equal(np.load(tmp_path / "a" / f"{n}.npy"), np.load(tmp_path / "b" / f"{n}.npy"))

def test_load_released_layout(tmp_path):
    "The released files: <name>.npy with 5 * 10,000 images, labels.npy, no manifest."
    n = 3
    data = np.arange(5 * n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    np.save(tmp_path / "frost.npy", data); np.save(tmp_path / "labels.npy", np.tile(np.array([4, 5, 6], np.uint8), 5))
    imgs, labs = load_cifar10c(tmp_path, "frost", 4)
    assert np.array_equal(imgs[:, 0, 0, 0], [9, 10, 11]) and labs.tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="does not exist"):
        load_cifar10c(tmp_path, "fog", 1)

# ---------------------------------------------------------------- metrics

def _table(f):
    return {c: np.array([f(i, s) for s in SEVERITIES], float) for i, c in enumerate(CORRUPTIONS)}

def test_mce_is_the_unnormalised_mean():
    errors = _table(lambda i, s: 0.01 * i + 0.1 * s)           # mean of i is 7, mean of s is 3
    assert mce(errors) == pytest.approx(0.07 + 0.3)
    as_array = np.array([errors[c] for c in CORRUPTIONS])
    assert mce(as_array) == pytest.approx(0.37)
    shuffled = dict(list(reversed(list(errors.items()))) + [("spatter", np.ones(5))])   # order of keys and extras ignored
    assert mce(shuffled) == pytest.approx(0.37)

def test_normalised_and_relative_mce_known_answers():
    errors = _table(lambda i, s: 0.2 + 0.02 * s)
    base = _table(lambda i, s: (0.4 + 0.04 * s) if i < 5 else (0.8 + 0.08 * s))
    # sum_s errors = 1.3; sum_s base = 2.6 (5 corruptions) or 5.2 (10 corruptions)
    assert mce(errors, base) == pytest.approx((5 * 0.5 + 10 * 0.25) / 15)
    # relative: sum_s (E - 0.1) = 0.8; sum_s (B - 0.2) = 1.6 or 4.2
    assert relative_mce(errors, 0.1, base, 0.2) == pytest.approx((5 * 0.8 / 1.6 + 10 * 0.8 / 4.2) / 15)

def test_metrics_reject_bad_tables():
    good = _table(lambda i, s: 0.1)
    with pytest.raises(ValueError, match="lacks the benchmark corruptions fog"):
        mce({k: v for k, v in good.items() if k != "fog"})
    with pytest.raises(ValueError, match=r"\[15, 5\]"):
        mce(np.zeros((19, 5)))
    with pytest.raises(ValueError, match="NaN"):
        mce({**good, "fog": np.full(5, np.nan)})
    with pytest.raises(ValueError, match="undefined"):
        relative_mce(good, 0.1, good, 0.1)

class _ConstantModel(torch.nn.Module):
    "Predicts class 1 for everything."
    def __init__(self):
        super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x):
        return torch.tensor([0.0, 1.0, 0.0]).expand(len(x), 3) + 0 * self.w

def test_corruption_accuracy_from_pairs_and_folders(tmp_path):
    x, y = _small(8), np.array([0, 1, 1, 2, 1, 0, 2, 1])
    table = corruption_accuracy(_ConstantModel(), (x, y), corruptions=["fog", "contrast"], progress=False)
    assert list(table) == ["fog", "contrast"] and all(np.allclose(v, [0.5] * 5) for v in table.values())
    make_cifar10c(x, y, tmp_path, corruptions=["fog"], severities=(2, 4), progress=False)
    table = corruption_accuracy(_ConstantModel(), tmp_path, corruptions=["fog"], severities=(2, 4), progress=False)
    assert table["fog"].tolist() == [0.5, 0.5]
