"""The MoCo v1/v2 views and the probe transforms: shapes, normalisation, blur, and determinism."""

from __future__ import annotations

import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from mauctl.data.augment import (
    MEAN,
    STD,
    RandomGaussianBlur,
    TwoViews,
    eval_transform,
    lincls_train_transform,
    pretrain_view,
    to_rgb,
)


def photo(width: int = 80, height: int = 60) -> Image.Image:
    """A colourful RGB image with structure, so that crops, flips and jitter all change it."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def saved_and_reopened(tmp_path, mode: str) -> Image.Image:
    """Write ``photo()`` in ``mode`` to disk with PIL and open it again, as a loader would."""
    rgb = photo()
    if mode == "I;16":
        wide = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        img, suffix = Image.fromarray(wide), ".png"
    elif mode == "CMYK":
        img, suffix = rgb.convert("CMYK"), ".jpg"  # PNG cannot hold CMYK
    else:
        img, suffix = rgb.convert(mode), ".png"
    path = tmp_path / f"probe-{mode.replace(';', '')}{suffix}"
    img.save(path)
    return Image.open(path)


def checkerboard(size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray((((x + y) % 2) * 255).astype(np.uint8)).convert("RGB")


def high_frequency_energy(img: Image.Image) -> float:
    grey = np.asarray(img.convert("L"), dtype=np.float64)
    return float(np.mean(np.diff(grey, axis=0) ** 2) + np.mean(np.diff(grey, axis=1) ** 2))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16"])
@pytest.mark.parametrize("aug", ["v1", "v2"])
@pytest.mark.parametrize("size", [32, 64])
def test_views_are_normalised_float_chw_for_every_input_mode(tmp_path, mode, aug, size):
    img = saved_and_reopened(tmp_path, mode)
    torch.manual_seed(0)
    view = pretrain_view(aug, size)(img)
    assert view.shape == (3, size, size)
    assert view.dtype == torch.float32
    assert torch.isfinite(view).all()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16"])
def test_probe_transforms_accept_every_input_mode(tmp_path, mode):
    img = saved_and_reopened(tmp_path, mode)
    assert lincls_train_transform(32)(img).shape == (3, 32, 32)
    assert eval_transform(32)(img).shape == (3, 32, 32)


def test_probe_view_flips_half_the_time_and_never_with_flip_off():
    # A left-to-right ramp at full scale: the crop keeps the ramp's direction unless the view is mirrored.
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1)))
    def mirrored(transform, n=200):
        torch.manual_seed(0)
        return sum(bool(v[0, :, 0].mean() > v[0, :, -1].mean()) for v in (transform(ramp) for _ in range(n)))
    assert 70 <= mirrored(lincls_train_transform(32, min_scale=1.0)) <= 130
    assert mirrored(lincls_train_transform(32, min_scale=1.0, flip=False)) == 0


def test_16_bit_images_are_scaled_to_8_bit_not_clipped():
    wide = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    rgb = to_rgb(Image.fromarray(wide))
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 0, 1, 128, 255]
    as_int32 = to_rgb(Image.fromarray(wide.astype(np.int32)))  # mode 'I', as older Pillow opens them
    assert np.asarray(as_int32)[0, :, 0].tolist() == [0, 0, 1, 128, 255]


def test_palette_image_with_transparency_converts_without_warning(tmp_path):
    palette = photo().convert("P")
    palette.save(tmp_path / "alpha.png", transparency=bytes([0] * 16 + [255] * 240))
    img = Image.open(tmp_path / "alpha.png")
    assert isinstance(img.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_rgb(img).mode == "RGB"


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="v3"):
        pretrain_view("v3", 32)


def test_eval_transform_normalises_mid_grey_with_mean_and_std():
    out = eval_transform(32)(Image.new("RGB", (50, 40), (128, 128, 128)))
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(MEAN, STD)])
    assert torch.allclose(out, expected[:, None, None].expand(3, 32, 32), atol=1e-6)


def test_eval_transform_resizes_shorter_side_to_256_then_crops_224():
    transform = eval_transform(224)
    assert transform(Image.new("RGB", (300, 200))).shape == (3, 224, 224)
    resize = next(t for t in transform.transforms if isinstance(t, T.Resize))
    assert resize(Image.new("RGB", (300, 200))).size == (384, 256)  # PIL sizes are (width, height)
    assert resize(Image.new("RGB", (200, 300))).size == (256, 384)


def test_blur_sigma_is_uniform_between_0_1_and_2():
    blur = RandomGaussianBlur((0.1, 2.0))
    torch.manual_seed(0)
    sigmas = [blur.draw_sigma() for _ in range(2000)]
    assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0
    assert abs(np.mean(sigmas) - 1.05) < 0.05


def test_blur_draws_sigma_from_torch_and_blurs():
    board = checkerboard()
    blur = RandomGaussianBlur((0.1, 2.0))
    torch.manual_seed(3)
    sigma = blur.draw_sigma()
    torch.manual_seed(3)
    blurred = blur(board)
    assert blurred.tobytes() == board.filter(ImageFilter.GaussianBlur(radius=sigma)).tobytes()

    torch.manual_seed(0)
    energies = [high_frequency_energy(blur(board)) for _ in range(20)]
    assert np.mean(energies) < 0.5 * high_frequency_energy(board)


def test_v2_recipe_applies_the_blur_half_of_the_time():
    applies = [t for t in pretrain_view("v2", 32).transforms if isinstance(t, T.RandomApply)]
    blurs = [t for t in applies if isinstance(t.transforms[0], RandomGaussianBlur)]
    assert len(blurs) == 1 and blurs[0].p == 0.5
    assert blurs[0].transforms[0].sigma == (0.1, 2.0)
    assert not any(isinstance(t, RandomGaussianBlur) for t in pretrain_view("v1", 32).transforms)


@pytest.mark.parametrize("aug", ["v1", "v2"])
def test_views_depend_only_on_the_torch_seed(aug):
    two_views = TwoViews(pretrain_view(aug, 32))
    img = photo()

    torch.manual_seed(7)
    random.seed(1)
    np.random.seed(1)
    q1, k1 = two_views(img)
    torch.manual_seed(7)
    random.seed(2)  # python's and numpy's RNGs must play no part
    np.random.seed(2)
    q2, k2 = two_views(img)
    torch.manual_seed(8)
    q3, k3 = two_views(img)

    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(q1, q3) and not torch.equal(k1, k3)
    assert not torch.equal(q1, k1)


def test_transforms_pickle_for_spawned_loader_workers():
    img = photo()
    for transform in (TwoViews(pretrain_view("v2", 32)), lincls_train_transform(32), eval_transform(32)):
        copy = pickle.loads(pickle.dumps(transform))
        torch.manual_seed(5)
        expected = transform(img)
        torch.manual_seed(5)
        got = copy(img)
        if isinstance(expected, tuple):  # TwoViews gives a (query, key) pair
            expected, got = torch.stack(expected), torch.stack(got)
        assert torch.equal(got, expected)
