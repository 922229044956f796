"ssl_book.augment: shapes, ranges, determinism, per-image randomness, and PIL oracles."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ssl_book.augment import (RANDAUGMENT_OPS, Augmenter, cutout, rand_augment, random_flip, random_translate,
                              strong_augment, weak_augment)

def _batch(n=8, c=3, s=16, seed=0):
    return torch.randint(0, 256, (n, c, s, s), generator=torch.Generator().manual_seed(seed)).float() / 255

def _pil(x):      # one float CHW image on the 1/255 grid -> PIL RGB
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())

def _from_pil(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255

def g(seed=0): return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fn", [lambda x: weak_augment(x, g()), lambda x: strong_augment(x, g()),
                                lambda x: rand_augment(x, g(), n_ops=3), lambda x: cutout(x, g())])
def test_shape_and_range(fn):
    x = _batch()
    y = fn(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1

def test_rejects_uint8_and_wrong_rank():
    with pytest.raises(ValueError, match="to_unit"):
        weak_augment((_batch() * 255).byte(), g())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        strong_augment(_batch()[0], g())

def test_same_seed_same_output_other_seed_differs():
    x = _batch()
    assert torch.equal(strong_augment(x, g(3)), strong_augment(x, g(3)))
    assert not torch.equal(strong_augment(x, g(3)), strong_augment(x, g(4)))

def test_rand_augment_is_per_image():
    "RandAugment alone (no translation, no cutout) gives a batch of identical images many different operations."
    x = _batch(1).expand(256, -1, -1, -1).contiguous()
    y = rand_augment(x, g(), n_ops=1).reshape(256, -1)
    # per-image ops and magnitudes: ~190 distinct (autocontrast, equalize and identity ignore the magnitude);
    # one op and magnitude for the whole batch would give 1
    assert len(torch.unique(y, dim=0)) >= 150
    same = [(y[i] == x[0].flatten()).all().item() for i in range(256)]
    assert 0 < sum(same) < 60                              # identity (and zero magnitudes) leave a few unchanged

def test_flip_oracle():
    x = _batch()
    y = random_flip(x, g(), p=0.5)
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)

def test_translate_is_a_window_of_the_reflect_padded_image():
    x, pad = _batch(6, s=10), 2
    y = random_translate(x, g(), pad)
    xp = F.pad(x, (pad,) * 4, mode="reflect")
    for i in range(len(x)):
        windows = [xp[i, :, a:a + 10, b:b + 10] for a in range(2 * pad + 1) for b in range(2 * pad + 1)]
        assert any(torch.equal(y[i], w) for w in windows)

def test_posterize_matches_pil():
    x = _batch(2)
    v = torch.full((2,), 0.5)                                            # 8 - round(4 * 0.5) = 6 bits
    ours = RANDAUGMENT_OPS["posterize"](x, v)
    for i in range(2):
        assert torch.allclose(ours[i], _from_pil(ImageOps.posterize(_pil(x[i]), 6)), atol=1e-6)

def test_solarize_matches_pil():
    x = _batch(2)
    v = 1 - 128.5 / 256                                                  # threshold level 128.5: invert >= 129
    ours = RANDAUGMENT_OPS["solarize"](x, torch.full((2,), v))
    for i in range(2):
        assert torch.allclose(ours[i], _from_pil(ImageOps.solarize(_pil(x[i]), 129)), atol=1e-6)

def test_autocontrast_matches_pil_to_one_level():
    x = _batch(2) * 0.5 + 0.2
    x = (x * 255).round() / 255
    ours = RANDAUGMENT_OPS["autocontrast"](x, torch.zeros(2))
    for i in range(2):
        assert (ours[i] - _from_pil(ImageOps.autocontrast(_pil(x[i])))).abs().max() <= 1.01 / 255

def test_equalize_is_monotone_and_spreads_values():
    x = _batch(3) * 0.3 + 0.3                                           # a narrow range of values
    y = RANDAUGMENT_OPS["equalize"](x, torch.zeros(3))
    for i in range(3):
        for c in range(3):
            a, b = x[i, c].flatten(), y[i, c].flatten()
            order = a.argsort()
            assert (b[order].diff() >= -1e-6).all()                       # order preserving
            assert b.max() - b.min() > 0.9                                # stretched to ~[0, 1]

def test_equalize_and_solarize_leave_flat_and_white_images():
    flat = torch.full((2, 3, 8, 8), 0.4)
    assert torch.equal(RANDAUGMENT_OPS["equalize"](flat, torch.zeros(2)), flat)       # as PIL does
    white = torch.ones(1, 3, 4, 4)
    assert torch.equal(RANDAUGMENT_OPS["solarize"](white, torch.zeros(1)), white)     # v = 0 is the identity

def test_translation_larger_than_the_image_is_an_error():
    with pytest.raises(ValueError, match="lower pad_frac"):
        random_translate(_batch(2, s=4), g(), pad=4)

def test_translate_x_shifts_content():
    x = torch.rand(1, 1, 10, 10)
    y = RANDAUGMENT_OPS["translate_x"](x, torch.ones(1))                 # 0.3 * 10 = 3 pixels
    assert torch.allclose(y[..., :7], x[..., 3:], atol=1e-5)
    assert torch.allclose(y[..., 7:], torch.full_like(y[..., 7:], 0.5), atol=1e-5)   # grey fill

def test_cutout_is_one_grey_square_within_the_limit():
    x = torch.zeros(200, 1, 16, 16)
    y = cutout(x, g(), max_frac=0.5)
    grey = (y == 0.5).float().sum((1, 2, 3))
    assert grey.max() <= 8 * 8 and (grey > 0).float().mean() > 0.8
    for i in torch.nonzero(grey > 0)[:20, 0]:
        rows, cols = torch.nonzero(y[i, 0] == 0.5, as_tuple=True)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h * w == grey[i]                                          # a filled rectangle
        # a square unless cut by the border
        assert h == w or rows.min() == 0 or cols.min() == 0 or rows.max() == 15 or cols.max() == 15

def test_augmenter_takes_uint8_and_respects_no_flip():
    u = (torch.arange(8 * 8).reshape(1, 1, 8, 8) * 4 % 256).to(torch.uint8).repeat(50, 1, 1, 1)
    a = Augmenter(seed=0, flip=False, pad_frac=0.0)
    assert torch.equal(a.weak(u), u.float() / 255)                       # no flip, no translation
    assert Augmenter(seed=0).strong(u).dtype == torch.float32

def test_augmentation_is_float32_under_autocast():
    "Regression: under bf16 autocast, rotate, shear and translate moved grey levels by up to 14/255."
    from ssl_book.augment import Augmenter
    x = (torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    ref = Augmenter(3)
    ref_w, ref_s = ref.weak(x), ref.strong(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = Augmenter(3)
        w, s = a.weak(x), a.strong(x)
    assert w.dtype == s.dtype == torch.float32
    assert torch.equal(w, ref_w) and torch.equal(s, ref_s)
