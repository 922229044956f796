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


# Contrastive views (Chapter 7): crops, colour jitter, grayscale, the article's colour affine.
from ssl_book.augment import color_affine, color_jitter, contrastive_augment, random_grayscale, random_resized_crop


@pytest.mark.parametrize("fn", [lambda x: random_resized_crop(x, g()), lambda x: color_jitter(x, g()),
                                lambda x: random_grayscale(x, g(), 0.5), lambda x: color_affine(x, g()),
                                lambda x: contrastive_augment(x, g()), lambda x: contrastive_augment(x, g(), color="affine")])
def test_contrastive_ops_shape_range_and_seed(fn):
    x = _batch()
    y = fn(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1
    assert torch.equal(fn(x), y)                                        # the same seed, the same views

def test_full_crop_is_the_identity():
    x = _batch()
    assert torch.allclose(random_resized_crop(x, g(), scale=(1.0, 1.0), ratio=(1.0, 1.0)), x, atol=1e-6)

def test_crop_area_and_ratio_are_drawn_per_image_within_their_ranges():
    "On a linear ramp, bilinear sampling is exact: the output's span is the crop's width (or height) as a fraction."
    B, S = 64, 16
    u = (2 * torch.arange(S) + 1) / S - 1                                  # pixel centres in grid units
    x = torch.stack([u[None, :].expand(S, S), u[:, None].expand(S, S)])[None].expand(B, 2, S, S)
    x = torch.cat([(x + 1) / 2, torch.zeros(B, 1, S, S)], 1).contiguous()   # in [0, 1]
    out = random_resized_crop(x, g(5), scale=(0.2, 0.6), ratio=(0.5, 2.0)) * 2 - 1
    w = (out[:, 0, :, -1] - out[:, 0, :, 0]).mean(1) / (u[-1] - u[0])
    h = (out[:, 1, -1, :] - out[:, 1, 0, :]).mean(1) / (u[-1] - u[0])
    area, ratio = w * h, w / h
    assert (area > 0.2 - 1e-4).all() and (area < 0.6 + 1e-4).all()
    assert (ratio > 0.5 - 1e-3).all() and (ratio < 2.0 + 1e-3).all()
    assert area.std() > 0.05 and ratio.std() > 0.1                          # per image, not one crop for the batch
    with pytest.raises(ValueError, match="scale"): random_resized_crop(x, g(), scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"): random_resized_crop(x, g(), ratio=(0.0, 1.0))

@pytest.mark.parametrize("op, ref", [("brightness", "adjust_brightness"), ("contrast", "adjust_contrast"),
                                     ("saturation", "adjust_saturation"), ("hue", "adjust_hue")])
def test_colour_operations_match_torchvision(op, ref):
    import torchvision.transforms.functional as TF
    from ssl_book import augment
    x = _batch(n=6)
    f = torch.tensor([-0.45, -0.2, 0.0, 0.1, 0.3, 0.5]) if op == "hue" else torch.tensor([0.0, 0.3, 0.8, 1.0, 1.4, 1.9])
    ours = getattr(augment, f"_adjust_{op}")(x, f)
    theirs = torch.stack([getattr(TF, ref)(xi, float(fi)) for xi, fi in zip(x, f)])
    assert (ours - theirs).abs().max() < 2e-4, (ours - theirs).abs().max()   # torchvision's grey weights: 0.2989

def test_color_jitter_is_per_image_and_p_zero_is_the_identity():
    x = _batch(n=32)
    assert torch.equal(color_jitter(x, g(), p=0.0), x)
    y = color_jitter(x.clamp(0.2, 0.6), g(), brightness=0.5, contrast=0, saturation=0, hue=0, p=1.0)
    scale = (y / x.clamp(0.2, 0.6)).flatten(1)                            # brightness only: one factor per image
    assert torch.allclose(scale.amin(1), scale.amax(1), atol=1e-5) and scale[:, 0].std() > 0.05
    with pytest.raises(ValueError, match="hue"): color_jitter(x, g(), hue=0.7)

def test_grayscale_and_grey_images():
    x = _batch()
    grey = random_grayscale(x, g(), p=1.0)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert torch.equal(random_grayscale(x, g(), p=0.0), x)
    one = _batch(c=1)
    assert torch.equal(random_grayscale(one, g(), p=1.0), one)           # nothing to remove from a grey image
    assert torch.allclose(color_jitter(one, g(), brightness=0, contrast=0, saturation=1.0, hue=0.5, p=1.0), one, atol=1e-6)

def test_color_affine_brightness_only_and_identity():
    x = _batch(n=16)
    assert torch.allclose(color_affine(x, g(), brightness=0.0, jitter=0.0), x)
    y = color_affine(x * 0.5, g(), brightness=0.6, jitter=0.0)
    scale = (y / (x * 0.5).clamp_min(1e-6)).flatten(1)[:, 10]
    assert ((scale > 0.4 - 1e-4) & (scale < 1.6 + 1e-4)).all() and scale.std() > 0.1
    with pytest.raises(ValueError, match="color"): contrastive_augment(x, g(), color="sepia")

def test_contrastive_views_respect_no_flip_and_are_float32_under_autocast():
    x = _batch(n=4)
    same = contrastive_augment(x, g(), flip=False, crop_scale=(1.0, 1.0), color="none", p_gray=0.0)
    assert torch.allclose(same, random_resized_crop(x, g(), scale=(1.0, 1.0)), atol=1e-6)   # no flip at all
    u8 = (x * 255).round().to(torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = Augmenter(seed=0).contrastive(u8)
    assert v.dtype == torch.float32 and v.shape == x.shape
