"""The tensor pipeline (batch_augment.py) against the PIL recipes of augment.py.

Three kinds of evidence, from strongest to weakest:

* the random choices: a worker draws exactly what torchvision draws for the PIL recipe under the
  same seed (replaying them with torchvision's PIL ops gives the PIL recipe's output bit for bit),
  and the vectorised draws of ``BatchAugment(views, generator)`` follow the same distributions;
* the ops: the same parameters applied by both pipelines give the same pixels, up to Pillow's
  8-bit rounding;
* the distributions: with independent draws, per-image statistics of each op and of the whole
  recipe are distributed alike (two-sample Kolmogorov-Smirnov, rates within binomial error).

Tolerances come from sampling error: for two samples of n and m values, the KS statistic exceeds
1.95 * sqrt((n + m) / (n m)) with probability 0.001 when the distributions are equal (the seeds are
fixed, so a pass is stable; the bound says how far from equal a distribution can be and still pass).
A rate from n draws with probability p has standard deviation sqrt(p (1 - p) / n); we allow 4.5 of them.
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import functional as TVF

from conftest import write_image_folder
from mauctl.data import batch_augment as ba
from mauctl.data.augment import MEAN, RECIPES, STD, RandomGaussianBlur, TwoViews, pretrain_view
from mauctl.data.loader import EpochSampler, SeededImages, decode_image

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors gain nothing from threads, and on a busy machine OpenMP's waiting threads make
    them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- helpers


def textures(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8: smooth random colour fields plus 20% noise, so every op changes them."""
    rng = np.random.default_rng(seed)
    smooth = torch.nn.functional.interpolate(torch.tensor(rng.random((n, 3, 4, 4))), size=(size, size),
                                             mode="bilinear", align_corners=False)
    pixels = 0.8 * smooth + 0.2 * torch.tensor(rng.random((n, 3, size, size)))
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def as_pil(batch: torch.Tensor) -> list[Image.Image]:
    return [TVF.to_pil_image(img) for img in batch]


def unnormalised(x: torch.Tensor) -> torch.Tensor:
    """Normalised views back to [0, 1]."""
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def ks_statistic(a, b) -> float:
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_bound(n: int, m: int) -> float:
    """The KS statistic that equal distributions exceed with probability 0.001."""
    return 1.95 * math.sqrt((n + m) / (n * m))


def rate_bound(p: float, n: int) -> float:
    return 4.5 * math.sqrt(p * (1 - p) / n)


def render_pil(img: Image.Image, box, params: torch.Tensor, aug: str, size: int) -> torch.Tensor:
    """One view made by torchvision's PIL ops, with the crop box and random choices given."""
    recipe = ba.recipe_for(aug)
    x = TVF.resized_crop(img, *box, [size, size], antialias=True)

    def grey(x):
        return TVF.rgb_to_grayscale(x, num_output_channels=3) if params[ba.GREY] else x

    def jitter(x):
        ops = {0: (TVF.adjust_brightness, ba.BRIGHTNESS), 1: (TVF.adjust_contrast, ba.CONTRAST),
               2: (TVF.adjust_saturation, ba.SATURATION), 3: (TVF.adjust_hue, ba.HUE)}
        if params[ba.JITTER]:
            for op in params[ba.ORDER:ba.ORDER + 4].long().tolist():
                fn, column = ops[op]
                x = fn(x, float(params[column]))
        return x

    x = jitter(grey(x)) if recipe.grey_first else grey(jitter(x))
    if params[ba.BLUR]:
        x = x.filter(ImageFilter.GaussianBlur(radius=float(params[ba.SIGMA])))
    if params[ba.FLIP]:
        x = TVF.hflip(x)
    return TVF.normalize(TVF.to_tensor(x), MEAN, STD)


def only(params: torch.Tensor, column: int) -> torch.Tensor:
    """``params`` with every op neutral except the one in ``column`` (a jitter factor, GREY, FLIP or BLUR)."""
    p = params.clone()
    for other in (ba.BRIGHTNESS, ba.CONTRAST, ba.SATURATION, ba.HUE, ba.GREY, ba.FLIP, ba.BLUR):
        if other != column:
            p[:, other] = 0.0 if other in (ba.HUE, ba.GREY, ba.FLIP, ba.BLUR) else 1.0
    return p


def saturation(x: torch.Tensor) -> torch.Tensor:
    top, bottom = x.amax(1), x.amin(1)
    return torch.where(top > 0, (top - bottom) / top.clamp_min(1e-8), 0.0)


def hue(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    top, delta = x.amax(1), (x.amax(1) - x.amin(1)).clamp_min(1e-8)
    h = torch.where(top == r, (g - b) / delta,
                    torch.where(top == g, 2 + (b - r) / delta, 4 + (r - g) / delta))
    return torch.remainder(h / 6, 1)


def grey_level(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    g = grey_level(x)
    return (g.diff(dim=1) ** 2).mean((1, 2)) + (g.diff(dim=2) ** 2).mean((1, 2))


# Per-image statistics of one op: what it changes, from the input and output batches in [0, 1].
STATISTICS = {
    ba.BRIGHTNESS: lambda i, o: o.mean((1, 2, 3)) - i.mean((1, 2, 3)),
    ba.CONTRAST: lambda i, o: grey_level(o).std((1, 2)) / grey_level(i).std((1, 2)),
    ba.SATURATION: lambda i, o: saturation(o).mean((1, 2)) - saturation(i).mean((1, 2)),
    # the circular mean hue shift, in turns, over the pixels that have a hue to speak of
    ba.HUE: lambda i, o: torch.angle((torch.exp(2j * math.pi * (hue(o) - hue(i)).double())
                                      * (saturation(i) > 0.2)).sum((1, 2))) / (2 * math.pi),
}
COLOUR_OPS = {ba.BRIGHTNESS: "brightness", ba.CONTRAST: "contrast", ba.SATURATION: "saturation",
              ba.HUE: "hue"}


def small_folder(tmp_path, per_class: int = 4, size=(40, 32)) -> list[tuple[str, int]]:
    write_image_folder(tmp_path, classes=2, per_class=per_class, size=size)
    return [(str(p), int(p.parent.name[1:])) for p in sorted((tmp_path / "train").rglob("*.jpg"))]


# ---------------------------------------------------------------- the random choices


def test_crop_boxes_are_torchvision_get_params_exactly():
    scale, ratio = ba.recipe_for("v2").scale, ba.recipe_for("v2").ratio
    # (1, 100) never fits a crop of area >= 20 px: torchvision's central fallback, every time
    for height, width in [(60, 80), (375, 500), (37, 200), (5, 5), (1, 100)]:
        for seed in range(150):
            torch.manual_seed(seed)
            img = torch.empty(3, height, width)
            expected = T.RandomResizedCrop.get_params(img, list(scale), list(ratio))
            got = ba.crop_box(height, width, scale, ratio, torch.Generator().manual_seed(seed))
            assert got == tuple(expected), (height, width, seed)


def test_crop_area_and_aspect_distributions_match_the_recipe():
    reference = pretrain_view("v2", 32).transforms[1]  # the recipe's own RandomResizedCrop
    assert isinstance(reference, T.RandomResizedCrop)
    n, height, width = 3000, 375, 500
    torch.manual_seed(0)
    img = torch.empty(3, height, width)
    theirs = [reference.get_params(img, reference.scale, reference.ratio) for _ in range(n)]
    generator = torch.Generator().manual_seed(1)
    recipe = ba.recipe_for("v2")
    ours = [ba.crop_box(height, width, recipe.scale, recipe.ratio, generator) for _ in range(n)]

    def area_and_log_aspect(boxes):
        h, w = np.array([b[2] for b in boxes], float), np.array([b[3] for b in boxes], float)
        return h * w / (height * width), np.log(w / h)

    for mine, reference_values in zip(area_and_log_aspect(ours), area_and_log_aspect(theirs)):
        assert ks_statistic(mine, reference_values) < ks_bound(n, n)
    areas = area_and_log_aspect(ours)[0]
    assert 0.199 < areas.min() and areas.max() <= 1  # scale (0.2, 1), up to rounding the sides


@pytest.mark.parametrize("aug", ["v1", "v2"])
def test_worker_draws_reproduce_the_pil_recipe_exactly(aug):
    """Same seed, same crops and choices: replayed with torchvision's PIL ops, bit-identical views."""
    img = as_pil(textures(1, 40, seed=3))[0].resize((40, 30))
    two_views = TwoViews(pretrain_view(aug, 24))
    recipe = ba.recipe_for(aug)
    for seed in range(150):
        torch.manual_seed(seed)
        expected = two_views(img)
        generator = torch.Generator().manual_seed(seed)
        for view in expected:
            box = ba.crop_box(30, 40, recipe.scale, recipe.ratio, generator)
            params = ba.draw_view_params(recipe, generator)
            assert torch.equal(render_pil(img, box, params, aug, 24), view), seed


def test_changing_only_the_recipe_definition_changes_both_pipelines_alike(tmp_path, monkeypatch):
    """One definition: every parameter of augment.RECIPES["v2"] changed, nothing else, and
    pretrain_view, TensorViews and BatchAugment all follow it with the same crops and choices."""
    published = RECIPES["v2"]
    changed = dataclasses.replace(published, scale=(0.6, 0.7), ratio=(0.5, 2.0), grey_p=0.6, grey_first=True,
                                  jitter=(0.2, 0.3, 0.5, 0.2), jitter_p=1.0, blur_p=0.9, sigma=(0.5, 1.0),
                                  flip_p=0.2)
    assert all(getattr(changed, f.name) != getattr(published, f.name) for f in dataclasses.fields(changed))
    monkeypatch.setitem(RECIPES, "v2", changed)

    samples = small_folder(tmp_path, per_class=1, size=(30, 40))  # 40 x 30 px
    img = decode_image(samples[0][0])
    pil_views = TwoViews(pretrain_view("v2", 24))
    tensor_views = ba.TensorViews(samples, "v2", 24)
    boxes_of = ba.TensorViews(samples, "v2", 24, decode_on="cuda")  # the same crops as boxes, not decoded
    augment = ba.BatchAugment("v2", 24)
    areas, all_params, levels = [], [], []
    for seed in range(100):
        torch.manual_seed(seed)
        expected = pil_views(img)
        views, params, _, _ = tensor_views[(0, seed)]
        boxes = boxes_of[(0, seed)][0].boxes.tolist()
        # the worker's crops and choices replayed with torchvision's PIL ops: the PIL views exactly
        for view, box, row in zip(expected, boxes, params):
            assert torch.equal(render_pil(img, box, row, "v2", 24), view), seed
            areas.append(box[2] * box[3] / (30 * 40))
        # and the batch ops on the worker's crops: the PIL pipeline's views up to rounding
        query, key = augment.two_views(views[None], params[None])
        levels += [(unnormalised(ours[0]) - unnormalised(theirs)).abs().mean() * 255
                   for ours, theirs in zip((query, key), expected)]
        all_params.append(params)
    assert np.mean(levels) < 2.5 and max(levels) < 5

    # the changed recipe was followed, not the published one
    p = torch.cat(all_params)
    assert 0.55 < min(areas) and max(areas) < 0.75  # scale (0.6, 0.7), up to rounding small crops' sides
    assert (p[:, ba.JITTER] == 1).all() and p[:, ba.HUE].abs().max() > 0.1
    blurred = p[p[:, ba.BLUR] > 0, ba.SIGMA]
    assert len(blurred) > 160 and blurred.min() >= 0.5 and blurred.max() <= 1.0


@pytest.mark.parametrize("aug", ["v1", "v2"])
def test_batch_draws_follow_torchvision_distributions(aug):
    n = 4000
    recipe = ba.recipe_for(aug)
    p = ba.BatchAugment(aug, 32).draw(n, torch.Generator().manual_seed(0))
    rates = ((ba.FLIP, 0.5), (ba.GREY, 0.2), (ba.JITTER, recipe.jitter_p), (ba.BLUR, recipe.blur_p))
    for column, probability in rates:
        assert abs(p[:, column].mean().item() - probability) <= rate_bound(probability, n) + 1e-9, column

    jittered = p[p[:, ba.JITTER] > 0]
    jitter = T.ColorJitter(*recipe.jitter)
    torch.manual_seed(1)
    ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    theirs = [jitter.get_params(*ranges) for _ in range(n)]
    for k, column in enumerate((ba.BRIGHTNESS, ba.CONTRAST, ba.SATURATION, ba.HUE)):
        assert ks_statistic(jittered[:, column], [t[k + 1] for t in theirs]) < ks_bound(len(jittered), n)
    # each op at each position of the order a quarter of the time, as torch.randperm(4)
    orders = jittered[:, ba.ORDER:ba.ORDER + 4].long()
    assert (orders.sort(dim=1).values == torch.arange(4)).all()
    share = torch.stack([(orders == op).float().mean(0) for op in range(4)])
    assert (share - 0.25).abs().max() < rate_bound(0.25, len(jittered))

    if recipe.blur_p:
        blur = RandomGaussianBlur((0.1, 2.0))
        torch.manual_seed(2)
        sigmas = [blur.draw_sigma() for _ in range(n)]
        blurred = p[p[:, ba.BLUR] > 0, ba.SIGMA]
        assert ks_statistic(blurred, sigmas) < ks_bound(len(blurred), n)
    else:
        assert (p[:, ba.BLUR] == 0).all()


# ---------------------------------------------------------------- the ops, same parameters


@pytest.mark.parametrize("column", list(COLOUR_OPS), ids=list(COLOUR_OPS.values()))
def test_colour_ops_match_pil_pixel_by_pixel_with_the_same_factors(column):
    images = textures(500, 24, seed=1)
    params = only(ba.BatchAugment("v1", 24).draw(500, torch.Generator().manual_seed(0)), column)
    ours = unnormalised(ba.BatchAugment("v1", 24).apply(images, params))
    fn = {ba.BRIGHTNESS: TVF.adjust_brightness, ba.CONTRAST: TVF.adjust_contrast,
          ba.SATURATION: TVF.adjust_saturation, ba.HUE: TVF.adjust_hue}[column]
    factors = params[:, column].tolist()
    theirs = torch.stack([TVF.to_tensor(fn(img, f)) for img, f in zip(as_pil(images), factors)])
    levels = (ours - theirs).abs() * 255
    # Pillow truncates each result to 8 bits (< 1 level; 0.35 on average) and rounds the grey
    # mean (contrast) or the luma (saturation) it blends with (< 0.5 level). Hue goes through 8-bit
    # HSV: the shift truncated to 1/255 turn, the hue rounded to 1/255 turn and wrapped at 256/255,
    # under 3/255 turn in all, which moves a channel by up to 6 x 3/255 x 255 = 18 levels.
    assert levels.mean() < (1.0 if column == ba.HUE else 0.6)
    assert levels.max() <= (18 if column == ba.HUE else 1.5)
    inputs = images.float() / 255
    difference = STATISTICS[column](inputs, ours) - STATISTICS[column](inputs, theirs)
    assert difference.abs().max() < 0.012  # the statistic itself moves by up to ~0.3 over the factor range


def test_greyscale_and_flip_match_pil_with_the_same_choices():
    images = textures(64, 24, seed=2)
    augment = ba.BatchAugment("v2", 24)
    params = augment.draw(64, torch.Generator().manual_seed(0))
    grey = unnormalised(augment.apply(images, only(params, ba.GREY)))
    flip = unnormalised(augment.apply(images, only(params, ba.FLIP)))
    for img, row, g, f in zip(as_pil(images), params, grey, flip):
        expected_grey = TVF.rgb_to_grayscale(img, 3) if row[ba.GREY] else img
        assert (g - TVF.to_tensor(expected_grey)).abs().max() * 255 <= 0.5 + 1e-3  # Pillow rounds the luma
        expected_flip = TVF.hflip(img) if row[ba.FLIP] else img
        assert (f - TVF.to_tensor(expected_flip)).abs().max() < 1e-5


def test_blur_matches_pillows_gaussian_blur():
    images = textures(40, 24, seed=4)
    inputs = images.float() / 255
    sigmas = torch.linspace(0.1, 2.0, 40)
    ours = ba.blur(inputs, sigmas, max_sigma=2.0)
    theirs = torch.stack([TVF.to_tensor(img.filter(ImageFilter.GaussianBlur(radius=float(s))))
                          for img, s in zip(as_pil(images), sigmas)])
    # Pillow rounds to 8 bits after each of its 6 box passes: at most 6 x 0.5 levels apart
    assert ((ours - theirs).abs() * 255).max() <= 3.0 + 0.01
    # Blur strength: the share of high-frequency energy left agrees within 3% from sigma 0.3 on.
    # Below, Pillow's rounding after each pass undoes most of a blur that moves pixels by under
    # half a level (ratio 1.00 for Pillow, 0.96 here at sigma 0.1): invisible either way.
    left_ours, left_theirs = high_frequency_energy(ours) / high_frequency_energy(inputs), \
        high_frequency_energy(theirs) / high_frequency_energy(inputs)
    visible = sigmas >= 0.3
    assert ((left_ours[visible] / left_theirs[visible]) - 1).abs().max() < 0.03
    assert torch.equal(ba.blur(inputs, torch.zeros(40), 2.0), inputs)  # sigma 0: untouched


def test_blur_boxes_are_pillows_variance_sigma_squared_within_3_sigma():
    sigmas = torch.linspace(0.1, 2.0, 20)
    boxes = ba.pil_blur_boxes(sigmas, 2.0).double()
    assert boxes.shape == (20, 5)
    kernels = boxes
    for _ in range(ba.BLUR_PASSES - 1):
        kernels = torch.stack([torch.from_numpy(np.convolve(k, b))
                               for k, b in zip(kernels.numpy(), boxes.numpy())])
    assert kernels.shape[1] == 13  # +-6 px = +-3 sigma at sigma 2
    offsets = torch.arange(13, dtype=torch.float64) - 6
    assert torch.allclose(kernels.sum(1), torch.ones(20, dtype=torch.float64))
    assert torch.allclose((kernels * offsets**2).sum(1), sigmas.double() ** 2, rtol=1e-5)


# ---------------------------------------------------------------- the distributions, independent draws


@pytest.mark.parametrize("column", list(COLOUR_OPS), ids=list(COLOUR_OPS.values()))
def test_colour_op_statistics_are_distributed_as_torchvisions(column):
    n = 3000
    images = textures(n, 24, seed=5)
    inputs = images.float() / 255
    name = COLOUR_OPS[column]
    reference = T.ColorJitter(**{name: 0.4})  # the v1 strengths (v2's hue is 0.1, a narrower case)
    torch.manual_seed(0)
    theirs = torch.stack([TVF.to_tensor(reference(img)) for img in as_pil(images)])
    augment = ba.BatchAugment("v1", 24)
    params = only(augment.draw(n, torch.Generator().manual_seed(1)), column)
    ours = unnormalised(augment.apply(images, params))
    # Beyond sampling error, Pillow's 8-bit rounding moves the statistics a little: their KS
    # distance with identical factors is 0.010 to 0.019 (measured), so 0.025 is added to the bound.
    statistic = STATISTICS[column]
    assert ks_statistic(statistic(inputs, ours), statistic(inputs, theirs)) < ks_bound(n, n) + 0.025


def test_greyscale_and_flip_rates_are_torchvisions():
    n = 3000
    images = textures(n, 16, seed=6)
    torch.manual_seed(0)
    pil_grey = [TVF.to_tensor(T.RandomGrayscale(0.2)(img)) for img in as_pil(images)]
    pil_flip = [TVF.to_tensor(T.RandomHorizontalFlip()(img)) for img in as_pil(images)]
    augment = ba.BatchAugment("v2", 16)
    params = augment.draw(n, torch.Generator().manual_seed(1))
    ours_grey = unnormalised(augment.apply(images, only(params, ba.GREY)))
    ours_flip = unnormalised(augment.apply(images, only(params, ba.FLIP)))
    inputs = images.float() / 255

    def grey_rate(views):
        return np.mean([float((v.amax(0) - v.amin(0)).max() < 1e-3) for v in views])

    def flip_rate(views):
        return np.mean([float((v - i.flip(-1)).abs().max() < 1e-3) for v, i in zip(views, inputs)])

    assert abs(grey_rate(ours_grey) - grey_rate(pil_grey)) < 2 * rate_bound(0.2, n)
    assert abs(flip_rate(ours_flip) - flip_rate(pil_flip)) < 2 * rate_bound(0.5, n)
    assert abs(grey_rate(ours_grey) - 0.2) < rate_bound(0.2, n)
    assert abs(flip_rate(ours_flip) - 0.5) < rate_bound(0.5, n)


@pytest.mark.parametrize("aug", ["v1", "v2"])
def test_whole_recipe_per_image_mean_and_std_are_distributed_as_the_pil_recipe(aug):
    n, size = 2000, 24
    images = textures(8, 40, seed=7)
    pil_view = pretrain_view(aug, size)
    torch.manual_seed(0)
    theirs = torch.stack([pil_view(img) for img in as_pil(images) for _ in range(n // 8)])
    generator = torch.Generator().manual_seed(1)
    scale, ratio = ba.recipe_for(aug).scale, ba.recipe_for(aug).ratio
    crops = torch.stack([ba.resized_crop(img, ba.crop_box(40, 40, scale, ratio, generator), size)
                         for img in images for _ in range(n // 8)])
    ours = ba.BatchAugment(aug, size)(crops, torch.Generator().manual_seed(2))
    # With identical choices the views differ by ~1.5 levels per pixel (Pillow truncates, so its
    # views are a little darker): KS distance 0.020 to 0.024 between the per-view means, 0.005
    # between the stds (measured), so 0.03 is added to the bound.
    for statistic in (lambda x: x.mean((1, 2, 3)), lambda x: x.std((1, 2, 3))):
        assert ks_statistic(statistic(ours), statistic(theirs)) < ks_bound(n, n) + 0.03


# ---------------------------------------------------------------- the loader path end to end


@pytest.mark.parametrize("aug", ["v1", "v2"])
def test_tensor_views_are_the_pil_recipes_views_up_to_rounding(tmp_path, aug):
    samples = small_folder(tmp_path)
    tensor_views = ba.TensorViews(samples, aug, 24)
    pil_views = SeededImages(samples, TwoViews(pretrain_view(aug, 24)), report_skipped=True)
    levels = []
    for index in range(len(samples)):
        for seed in range(12):
            views, params, label, skipped = tensor_views[(index, seed)]
            (q, k), pil_label, pil_skipped = pil_views[(index, seed)]
            assert (views.dtype, views.shape, params.shape) == (torch.uint8, (2, 3, 24, 24), (2, ba.PARAMS))
            assert (label, skipped) == (pil_label, pil_skipped)
            query, key = ba.BatchAugment(aug, 24).two_views(views[None], params[None])
            levels += [(unnormalised(query[0]) - unnormalised(q)).abs().mean() * 255,
                       (unnormalised(key[0]) - unnormalised(k)).abs().mean() * 255]
    # Pillow truncates after each colour op (~0.35 level each), resizes in 8 bits and shifts hue in
    # 8-bit HSV: ~1.5 levels apart per pixel on average (measured 0.5 to 3 per view). A wrong choice
    # (another crop, a missing flip, greyscale in the wrong place) puts a view tens of levels apart.
    assert np.mean(levels) < 2.5 and max(levels) < 5


def test_decoding_gives_pillows_pixels_for_every_format_and_mode(tmp_path):
    y, x = np.mgrid[0:30, 0:40]
    rgb = Image.fromarray(np.stack([x * 6, y * 8, (x * y) % 256], axis=-1).astype(np.uint8))
    wide = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    cases = {
        "rgb.jpg": (rgb, {}), "grey.jpg": (rgb.convert("L"), {}), "cmyk.jpg": (rgb.convert("CMYK"), {}),
        "progressive.jpg": (rgb, {"progressive": True}), "rgb.png": (rgb, {}),
        "grey.png": (rgb.convert("L"), {}), "la.png": (rgb.convert("LA"), {}),
        "rgba.png": (rgb.convert("RGBA"), {}), "p.png": (rgb.convert("P"), {}),
        "p-alpha.png": (rgb.convert("P"), {"transparency": bytes([0] * 16 + [255] * 240)}),
        "16bit.png": (wide, {}), "rgb.webp": (rgb, {"lossless": True}), "rgb.gif": (rgb, {}),
        "rgb.bmp": (rgb, {}), "rgb.tiff": (rgb, {}),
    }
    for name, (img, options) in cases.items():
        img.save(tmp_path / name, **options)
        decoded = ba.decode_file(str(tmp_path / name))
        assert decoded.dtype == torch.uint8 and decoded.shape == (3, 30, 40), name
        pillow = np.asarray(decode_image(str(tmp_path / name)))
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), pillow), name


def test_bad_images_are_replaced_and_reported_as_seeded_images_does(tmp_path):
    samples = small_folder(tmp_path, per_class=3)
    good = Image.open(samples[0][0])
    folder = tmp_path / "train" / "c0"
    (folder / "000.jpg").write_bytes((folder / "000.jpg").read_bytes()[:300])  # truncated
    (folder / "001.jpg").write_bytes(b"")
    (folder / "002.jpg").write_bytes(b"shopping list: eggs, milk\n")
    (tmp_path / "train" / "c1" / "000.jpg").unlink()  # deleted since the folder was scanned
    good.save(tmp_path / "train" / "c1" / "001.jpg")
    tensor_views = ba.TensorViews(samples, "v2", 16)
    seeded = SeededImages(samples, TwoViews(pretrain_view("v2", 16)), report_skipped=True)
    for index in range(len(samples)):
        views, _, label, skipped = tensor_views[(index, 5)]
        _, pil_label, pil_skipped = seeded[(index, 5)]
        assert (label, skipped) == (pil_label, pil_skipped)
        # the next image that decodes, with this sample's seed
        assert torch.equal(views, tensor_views[(index + len(skipped), 5)][0])
    assert [reason.split(" (")[0] for _, reason in tensor_views[(0, 5)][3]] == [
        "truncated file", "empty file", "not an image file Pillow can read",
        "deleted since the folder was scanned"]

    everything_bad = [(str(folder / "001.jpg"), 0), (str(folder / "002.jpg"), 1)]
    views, params, label, skipped = ba.TensorViews(everything_bad, "v2", 16)[(1, 0)]
    assert views.shape == (2, 3, 16, 16) and (views == 0).all() and label == 1 and len(skipped) == 2


def test_views_depend_only_on_index_and_seed_not_on_workers_or_batches(tmp_path):
    samples = small_folder(tmp_path, per_class=6)

    def views_by_index(workers: int, global_batch: int) -> dict[int, tuple]:
        sampler = EpochSampler(len(samples), global_batch, rank=0, world_size=1, seed=3)
        loader = ba.make_tensor_loader(samples, "v2", 16, sampler, workers, pin_memory=False,
                                       persistent=False)
        order = [index for index, _ in sampler]
        found, row = {}, 0
        for views, params, labels, skipped in loader:
            assert views.dtype == torch.uint8 and views.shape == (global_batch, 2, 3, 16, 16)
            assert params.dtype == torch.float32 and params.shape == (global_batch, 2, ba.PARAMS)
            assert labels.dtype == torch.int64 and skipped == {}
            for i in range(global_batch):
                found[order[row]] = (views[i], params[i])
                row += 1
        return found

    reference = views_by_index(workers=0, global_batch=4)
    for workers, global_batch in ((2, 4), (0, 6)):
        other = views_by_index(workers, global_batch)
        for index in set(reference) & set(other):
            assert torch.equal(reference[index][0], other[index][0])
            assert torch.equal(reference[index][1], other[index][1])


# ---------------------------------------------------------------- contracts


def test_batch_ops_are_per_row_reproducible_and_accept_uint8_or_float():
    augment = ba.BatchAugment("v2", 16)
    views = textures(12, 16, seed=8)
    params = augment.draw(12, torch.Generator().manual_seed(0))
    out = augment.apply(views, params)
    assert out.dtype == torch.float32 and out.shape == (12, 3, 16, 16) and torch.isfinite(out).all()
    # a row's output is its own business: the same for any batch it is in
    rows = torch.tensor([7, 2, 11])
    assert torch.allclose(augment.apply(views[rows], params[rows]), out[rows], atol=1e-6)
    assert torch.allclose(augment.apply(views.float() / 255, params), out, atol=1e-5)
    # choices drawn from a generator: the same seed, the same views
    first = augment(views, torch.Generator().manual_seed(4))
    assert torch.equal(first, augment(views, torch.Generator().manual_seed(4)))
    assert not torch.equal(first, augment(views, torch.Generator().manual_seed(5)))
    pairs = torch.stack([views, views], dim=1)
    query, key = augment.two_views(pairs, generator=torch.Generator().manual_seed(4))
    assert query.shape == key.shape == (12, 3, 16, 16) and not torch.equal(query, key)


def test_mid_grey_with_no_op_is_normalised_with_mean_and_std():
    augment = ba.BatchAugment("v1", 8)
    neutral = only(augment.draw(1, torch.Generator().manual_seed(0)), -1)
    out = augment.apply(torch.full((1, 3, 8, 8), 128, dtype=torch.uint8), neutral)
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(MEAN, STD)])
    assert torch.allclose(out[0], expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-6)


def test_the_gpu_way_of_selecting_rows_gives_the_same_views(monkeypatch):
    augment = ba.BatchAugment("v2", 16)
    views = textures(16, 16, seed=9)
    params = augment.draw(16, torch.Generator().manual_seed(0))
    indexed = augment.apply(views, params)
    monkeypatch.setattr(ba, "_indexing_is_free", lambda x: False)  # every row computed, a where picks
    assert torch.allclose(augment.apply(views, params), indexed, atol=1e-5)


def test_unknown_recipe_and_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="v3"):
        ba.BatchAugment("v3", 32)
    with pytest.raises(ValueError, match="v3"):
        ba.TensorViews([], "v3", 32)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        ba.BatchAugment("v2", 32)(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_gpu_decoding_branch_up_to_the_decoder_agrees_with_the_cpu_path(tmp_path):
    """decode_on="cuda" up to nvJPEG: same crops and choices; decoded on the CPU here, the same views."""
    samples = small_folder(tmp_path, per_class=2)
    (tmp_path / "train" / "c0" / "000.jpg").write_bytes(b"")  # bad: replaced by the next image
    cpu, gpu = ba.TensorViews(samples, "v1", 16), ba.TensorViews(samples, "v1", 16, decode_on="cuda")
    batch_cpu = [cpu[(i, 9)] for i in range(len(samples))]
    encoded, params, labels, skipped = ba.collate_encoded([gpu[(i, 9)] for i in range(len(samples))])
    assert torch.equal(encoded.pin_memory().to("cpu"), torch.stack([item[0] for item in batch_cpu]))
    assert torch.equal(params, torch.stack([item[1] for item in batch_cpu]))
    assert labels.tolist() == [item[2] for item in batch_cpu] and list(skipped) == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_views_are_the_cpu_views(tmp_path):
    augment = ba.BatchAugment("v2", 16)
    views = textures(32, 16, seed=10)
    params = augment.draw(32, torch.Generator().manual_seed(0))
    on_gpu = augment.apply(views.cuda(), params.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), augment.apply(views, params), atol=1e-4)
    drawn = augment(views.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert drawn.device.type == "cuda" and drawn.shape == (32, 3, 16, 16)
    samples = small_folder(tmp_path, per_class=2)
    gpu = ba.TensorViews(samples, "v2", 16, decode_on="cuda")
    encoded = ba.collate_encoded([gpu[(i, 1)] for i in range(len(samples))])[0]
    cpu = torch.stack([ba.TensorViews(samples, "v2", 16)[(i, 1)][0] for i in range(len(samples))])
    decoded = encoded.to("cuda")
    assert decoded.device.type == "cuda" and decoded.shape == cpu.shape
    # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: 3.41 levels apart on average on an H200
    # (2026-11-29) at 16 px; a wrong image or a corrupted buffer is tens of levels apart
    assert (decoded.cpu().float() - cpu.float()).abs().mean() < 5


def test_datasets_and_augment_pickle_for_spawned_workers(tmp_path):
    samples = small_folder(tmp_path, per_class=1)
    for dataset in (ba.TensorViews(samples, "v2", 16), ba.TensorViews(samples, "v1", 16, decode_on="cuda")):
        copy = pickle.loads(pickle.dumps(dataset))
        assert torch.equal(copy[(0, 1)][1], dataset[(0, 1)][1])
    assert repr(pickle.loads(pickle.dumps(ba.BatchAugment("v1", 16)))) == "BatchAugment('v1', 16)"


def test_augmentation_grid_shows_both_pipelines_side_by_side(tmp_path):
    samples = small_folder(tmp_path, per_class=1)
    out = ba.augmentation_grid([path for path, _ in samples], "v2", 32, tmp_path / "grid.png", n=3)
    grid = Image.open(out)
    cell = 96 + 2  # 32 px views enlarged 3x, 2 px apart
    assert grid.size == (2 * 3 * cell + 12, 14 + 2 * cell)
    pixels = np.asarray(grid.convert("RGB"), dtype=np.float64)
    pil_half, tensor_half = pixels[14:, :3 * cell], pixels[14:, 3 * cell + 12:]
    assert np.abs(pil_half - tensor_half).mean() < 4  # same seeds per column: the same augmentations
