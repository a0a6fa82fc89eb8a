"""The MoCo v1/v2 views of augment.py as batched tensor ops: decode and crop in loader workers,
then colour, greyscale, blur, flip and normalisation on whole uint8 batches, on the GPU or the CPU.
Both pipelines are built from augment.py's recipes (`Recipe`, ``RECIPES``); none of their
parameters is written here.

The contract, for a training loop with ``data.pipeline = "tensor"``::

    loader = make_tensor_loader(samples, aug, image_size, sampler, workers, pin_memory)
    augment = BatchAugment(aug, image_size)
    for views, params, labels, skipped in loader:
        views = views.to(device, non_blocking=True)    # (B, 2, 3, S, S) uint8: two crops per image
        params = params.to(device, non_blocking=True)  # (B, 2, PARAMS) float32: each view's choices
        query, key = augment.two_views(views, params)  # two (B, 3, S, S) float32, normalised
        bad_images.add(skipped)                         # {row: ((path, reason), ...)}, as SeededImages

Workers (`TensorViews`) read and decode each image, take two RandomResizedCrops of it resized to
S x S, and draw every random choice of both views from a ``torch.Generator`` seeded with the
sampler's per-sample seed: the same calls, in the same order, as torchvision makes for
``TwoViews(pretrain_view(aug, S))`` under ``torch.manual_seed(seed)``. So a sample's views depend
only on (seed, epoch, index), as in loader.py (not on the workers, the world size or the rest of
the batch), and the random choices are exactly those of the PIL recipe. Only the arithmetic differs:

* decode: torchvision.io (libjpeg-turbo, libpng, libwebp) for JPEG, PNG and WebP, which gives
  Pillow's pixels for those; other formats, and files torchvision refuses, go to Pillow.
* resize: antialiased bilinear on the uint8 tensor, torchvision's Pillow-like kernel (within 1 level).
* colour ops in float32 without rounding between ops (Pillow truncates to 8 bits after each, so its
  views are ~1 level darker); contrast blends with the float mean of the greyscale image (Pillow
  with that mean rounded); hue is rotated in float HSV (Pillow in 8-bit HSV).
* greyscale: ITU-R 601-2 luma (0.299, 0.587, 0.114), Pillow's convert("L") weights.
* blur: Pillow's GaussianBlur is not a sampled Gaussian but three passes per axis of an "extended"
  box filter (Gwosdek et al. 2011) of variance sigma^2. We apply those same boxes, each image its
  own (5 taps for sigma <= 2; three passes reach +-6 px, i.e. +-3 sigma at sigma = 2), repeating edge
  pixels before each pass as Pillow does. A sampled Gaussian would blur less for small sigma
  (variance 0.21 instead of 0.25 at sigma 0.5). Pillow rounds to 8 bits after each pass, which
  cancels most of a blur of sigma < 0.3 (under half a level a pass); here such blurs stay.

``BatchAugment(views, generator)`` instead draws the choices from ``generator`` on the views'
device (same distributions, vectorised), for batches that do not come from `TensorViews`.
``decode_on="cuda"`` makes workers send the encoded files, decoded by nvJPEG in `EncodedViews.to`
on a side CUDA stream (see `decode_jpegs` for why). CI has no GPU: it runs everything up to the
decoder, and the stream protocol with CUDA mocked; `gpu_decode_ordering_errors` checks on a GPU.

torchvision 0.29 deprecates torchvision.io's image decoders in favour of TorchCodec; we silence that
one warning, and Pillow remains the fallback for anything torchvision.io refuses.
"""
from __future__ import annotations

import io
import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF

from mauctl.data.augment import MEAN, STD, Recipe, pretrain_view, recipe_for, to_rgb
from mauctl.data.loader import Skipped, collate, first_decodable, make_loader
from mauctl.data.loader import decode_image as decode_with_pillow

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

LUMA = (0.299, 0.587, 0.114)
TORCHVISION_FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow's names of the formats torchvision.io decodes here

# Columns of a params row, one row per view. ORDER holds torchvision's ColorJitter permutation
# (op ids below); a view without colour jitter has identity factors.
FLIP, GREY, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, BLUR, SIGMA = 0, 1, 2, 3, 4, 5, 6, 7, 11, 12
PARAMS = 13
BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP = 0, 1, 2, 3


# ---------------------------------------------------------------- decoding


def decode_bytes(data: bytes) -> torch.Tensor:
    """An encoded image as a (3, H, W) uint8 RGB tensor, with the pixels loader.decode_image would give.

    Pillow reads the header first, so a file that is not an image or is too large fails as it does
    in SeededImages (same reasons in the bad-image report).
    """
    header = Image.open(io.BytesIO(data))  # the header only: not an image? too large? Pillow raises here
    if header.format in TORCHVISION_FORMATS:
        try:
            return _rgb8(decode_image(_byte_tensor(data), mode=ImageReadMode.RGB))
        except RuntimeError:
            pass  # truncated, or a variant torchvision does not read: Pillow decodes it or says what is wrong
    header.load()
    return TF.pil_to_tensor(to_rgb(header))


def decode_file(path: str) -> torch.Tensor:
    return decode_bytes(Path(path).read_bytes())


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _rgb8(img: torch.Tensor) -> torch.Tensor:
    if img.dtype == torch.uint16:  # 16-bit PNG: keep the high byte, as to_rgb does
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img


# ---------------------------------------------------------------- per image, in loader workers


def crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawing from ``generator``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_aspect = torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        aspect_ratio = torch.exp(log_aspect).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # ten misses: the central crop torchvision falls back to
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: torch.Tensor, box: Sequence[int], size: int) -> torch.Tensor:
    """The crop ``box`` of a (3, H, W) image, resized to (3, size, size): antialiased bilinear, as Pillow."""
    return TF.resized_crop(img, *box, size=[size, size], interpolation=T.InterpolationMode.BILINEAR,
                           antialias=True)


def draw_view_params(recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """One view's random choices after its crop (a PARAMS row): torchvision's draws, in the recipe's order."""
    p = torch.zeros(PARAMS)
    p[[BRIGHTNESS, CONTRAST, SATURATION]] = 1.0
    p[ORDER:ORDER + 4] = torch.arange(4.0)

    def rand() -> torch.Tensor:
        return torch.rand(1, generator=generator)

    def grey() -> None:  # RandomGrayscale
        p[GREY] = float(rand() < recipe.grey_p)

    def jitter() -> None:  # RandomApply([ColorJitter]) (no draw when p == 1), then ColorJitter.get_params
        if recipe.jitter_p < 1 and recipe.jitter_p < rand():
            return
        p[JITTER] = 1.0
        p[ORDER:ORDER + 4] = torch.randperm(4, generator=generator).float()
        for column, bounds in zip((BRIGHTNESS, CONTRAST, SATURATION, HUE), recipe.ranges()):
            if bounds is not None:
                p[column] = float(torch.empty(1).uniform_(bounds[0], bounds[1], generator=generator))

    for step in ((grey, jitter) if recipe.grey_first else (jitter, grey)):
        step()
    if recipe.blur_p > 0 and not recipe.blur_p < rand():  # RandomApply([RandomGaussianBlur])
        p[BLUR] = 1.0
        p[SIGMA] = torch.empty(()).uniform_(*recipe.sigma, generator=generator).item()
    p[FLIP] = float(rand() < recipe.flip_p)  # RandomHorizontalFlip
    return p


class TensorViews(Dataset):
    """``dataset[(index, seed)]`` -> (views (2, 3, S, S) uint8, params (2, PARAMS), label, skipped).

    The tensor counterpart of ``SeededImages(samples, TwoViews(pretrain_view(aug, S)), report_skipped=True)``
    with the same bad-image policy (loader.first_decodable). With ``decode_on="cuda"`` the worker
    only reads the file and its header (size, bad-image checks) and ``views`` is an `EncodedImage`,
    decoded and cropped on the GPU by `EncodedViews.to`.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], aug: str, image_size: int,
                 scale: tuple[float, float] | None = None, decode_on: str = "cpu") -> None:
        if decode_on not in ("cpu", "cuda"):
            raise ValueError(f"decode_on must be 'cpu' or 'cuda', not {decode_on!r}")
        self.samples, self.recipe, self.image_size = samples, recipe_for(aug), image_size
        self.scale = self.recipe.scale if scale is None else scale  # another scale departs from pretrain_view
        self.decode_on = decode_on

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        on_gpu = self.decode_on == "cuda"
        img, label, skipped = first_decodable(self.samples, index, read_encoded if on_gpu else decode_file)
        if img is None:  # only bad images around this one: a blank stands in, and the bad count stops the run
            img = torch.zeros(3, 32, 32, dtype=torch.uint8)
            img = EncodedImage(_byte_tensor(_png(img)), 32, 32) if on_gpu else img
        height, width = (img.height, img.width) if on_gpu else img.shape[-2:]
        generator = torch.Generator().manual_seed(seed)
        boxes, params = [], []
        for _ in range(2):  # crop then colour, view after view: the order TwoViews(pretrain_view) draws in
            boxes.append(crop_box(height, width, self.scale, self.recipe.ratio, generator))
            params.append(draw_view_params(self.recipe, generator))
        if on_gpu:
            views = EncodedImage(img.data, img.height, img.width, torch.tensor(boxes), self.image_size)
        else:
            views = torch.stack([resized_crop(img, box, self.image_size) for box in boxes])
        return views, torch.stack(params), label, skipped


def make_tensor_loader(samples: Sequence[tuple[str, int]], aug: str, image_size: int, sampler: Sampler,
                       workers: int, pin_memory: bool, scale: tuple[float, float] | None = None,
                       decode_on: str = "cpu", persistent: bool = True) -> DataLoader:
    """Batches (views, params, labels, skipped) for `BatchAugment.two_views`; see the module docstring.

    ``sampler`` yields (index, seed) as loader.EpochSampler does. With ``decode_on="cuda"``, ``views``
    is an `EncodedViews` whose ``.to(device)`` decodes and crops on the GPU.
    """
    dataset = TensorViews(samples, aug, image_size, scale=scale, decode_on=decode_on)
    return make_loader(dataset, sampler, workers, pin_memory, persistent=persistent,
                       collate_fn=collate if decode_on == "cpu" else collate_encoded)


# ---------------------------------------------------------------- whole batches, on any device


class BatchAugment:
    """The colour, greyscale, blur, flip and normalisation of one recipe, on a batch of crops.

    ``apply(views, params)``: each row of ``params`` (from the loader, or `draw`) says what happens
    to its view. ``augment(views, generator)``: the same with choices drawn from ``generator``, which
    must be on the views' device (None: torch's default generator there). Views are (B, 3, S, S)
    uint8, or float in [0, 1], and are not modified; the result is float32 on their device.
    """

    def __init__(self, aug: str, image_size: int) -> None:
        self.aug, self.recipe, self.image_size = aug, recipe_for(aug), image_size
        self._normalisation: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.aug!r}, {self.image_size})"

    def __call__(self, views: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(views, self.draw(len(views), generator, views.device))

    def two_views(self, views: torch.Tensor, params: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key) from the loader's (B, 2, 3, S, S) views and (B, 2, PARAMS) params (or generator)."""
        flat = views.flatten(0, 1)
        out = self.apply(flat, params.flatten(0, 1)) if params is not None else self(flat, generator)
        query, key = out.unflatten(0, (len(views), 2)).unbind(1)
        return query, key

    def draw(self, n: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """(n, PARAMS) random choices with the recipe's distributions, drawn at once on ``device``."""
        r = self.recipe
        u = torch.rand(n, 9, generator=generator, device=device)
        p = torch.zeros(n, PARAMS, device=device)
        jitter, blur = u[:, 2] < r.jitter_p, u[:, 7] < r.blur_p
        p[:, FLIP] = (u[:, 0] < r.flip_p).float()
        p[:, GREY] = (u[:, 1] < r.grey_p).float()
        p[:, JITTER] = jitter.float()
        for k, (column, bounds) in enumerate(zip((BRIGHTNESS, CONTRAST, SATURATION, HUE), r.ranges())):
            identity = 0.0 if column == HUE else 1.0
            drawn = identity if bounds is None else bounds[0] + (bounds[1] - bounds[0]) * u[:, 3 + k]
            p[:, column] = torch.where(jitter, drawn, identity)
        p[:, ORDER:ORDER + 4] = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1).float()
        p[:, BLUR] = blur.float()
        p[:, SIGMA] = torch.where(blur, r.sigma[0] + (r.sigma[1] - r.sigma[0]) * u[:, 8], 0.0)
        return p

    def apply(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if views.ndim != 4 or views.shape[1] != 3 or views.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected views of shape (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(views.shape)}")
        x = views.to(torch.float32, copy=True)  # ours to modify in place
        if views.dtype == torch.uint8:
            x.div_(255)
        params = params.to(x.device, torch.float32)
        if self.recipe.grey_first:
            x = on_rows(x, params[:, GREY] > 0, lambda x, i: luma(x).expand_as(x))
        x = colour_jitter(x, params)
        if not self.recipe.grey_first:
            x = on_rows(x, params[:, GREY] > 0, lambda x, i: luma(x).expand_as(x))
        if self.recipe.blur_p > 0:
            sigma = params[:, SIGMA]
            x = on_rows(x, params[:, BLUR] > 0, lambda x, i: blur(x, sigma[i], self.recipe.sigma[1]))
        x = on_rows(x, params[:, FLIP] > 0, lambda x, i: x.flip(-1))
        mean, std = self._mean_std(x.device)
        return x.sub_(mean).div_(std)

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """MEAN and STD as (1, 3, 1, 1) tensors on ``device``, copied there once: a copy per batch
        would make the host wait for all the work queued on the device."""
        if device not in self._normalisation:
            mean, std = (torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (MEAN, STD))
            self._normalisation[device] = mean, std
        return self._normalisation[device]


def _rows(values: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1), to broadcast one value per image."""
    return values.view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W): Pillow's convert("L") weights."""
    return (x[:, 0:1] * LUMA[0]).add_(x[:, 1:2], alpha=LUMA[1]).add_(x[:, 2:3], alpha=LUMA[2])


def colour_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with each row's factors and order, all rows at once.

    Brightness, contrast and saturation are one blend ``f * x + (1 - f) * degenerate`` with a
    per-row degenerate image (black, the mean grey level, the greyscale image); each step clamps to
    [0, 1], as Pillow saturates 8-bit values. Returns a new tensor.
    """
    ones = torch.ones_like(params[:, 0])
    factors = torch.stack([params[:, BRIGHTNESS], params[:, CONTRAST], params[:, SATURATION], ones], dim=1)
    hue = params[:, HUE]
    for position in range(4):
        op = params[:, ORDER + position].long()
        f = _rows(factors.gather(1, op[:, None]).squeeze(1))
        grey = luma(x)
        op4 = _rows(op)
        degenerate = torch.where(op4 == CONTRAST_OP, grey.mean(dim=(1, 2, 3), keepdim=True),
                                 torch.where(op4 == SATURATION_OP, grey, 0.0))
        x = torch.lerp(degenerate, x, f).clamp_(0, 1)
        x = on_rows(x, (op == HUE_OP) & (params[:, JITTER] > 0), lambda x, i: adjust_hue(x, hue[i]))
    return x


def on_rows(x: torch.Tensor, rows: torch.Tensor, fn) -> torch.Tensor:
    """``fn(x[rows], rows)`` where ``rows`` is true, ``x`` elsewhere (written into ``x`` on the CPU).

    On the CPU only those rows are computed. On a GPU every row is and a where picks: selecting
    rows by a mask would make the host wait for the GPU (the hue rotation then costs 4 passes
    over the batch instead of 1, a few milliseconds per batch of 256 at 224 px on a recent GPU).
    """
    if not _indexing_is_free(x):
        return torch.where(_rows(rows), fn(x, slice(None)), x)
    index = rows.nonzero().squeeze(1)
    if len(index):
        x[index] = fn(x[index], index)
    return x


def _indexing_is_free(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate each row's hue by ``hue`` turns in HSV, keeping saturation and value (torchvision's RGB->HSV).

    Back to RGB with channel(n) = V - (V - min) * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6,
    n = 5, 3, 1 for R, G, B: the closed form of HSV -> RGB, cheaper than the six-case table.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, 1.0)
    h6 = torch.where(maxc == r, (g - b) / safe,  # hue in sixths of a turn
                     torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h6 = torch.remainder(h6 + 6 * hue.view(-1, 1, 1), 6)
    channels = []
    for n in (5, 3, 1):
        k = torch.remainder(n + h6, 6)
        channels.append(maxc - delta * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)


BLUR_PASSES = 3  # Pillow's GaussianBlur: three box filters per axis


def pil_blur_boxes(sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """(B,) sigmas -> (B, 2 l_max + 3) boxes of Pillow's GaussianBlur(radius=sigma); sigma 0: the identity.

    Pillow's box has a fractional radius l + a (weights a, 1, ..., 1, a), from Gwosdek et al.'s
    formula, so that BLUR_PASSES of them have variance sigma^2. l = 1 for sigma <= 2 (5 taps).
    """
    def integer_radius(s2: torch.Tensor) -> torch.Tensor:
        return torch.floor((torch.sqrt(12 * s2 + 1) - 1) / 2)

    s2 = sigma.double() ** 2 / BLUR_PASSES
    l = integer_radius(s2)[:, None]
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2[:, None]) / (6 * (s2[:, None] - (l + 1) ** 2))
    l_max = int(integer_radius(torch.tensor(max_sigma, dtype=torch.float64) ** 2 / BLUR_PASSES))
    t = torch.arange(-(l_max + 1), l_max + 2, device=sigma.device).abs()[None]
    box = torch.where(t <= l, 1.0, torch.where(t == l + 1, a, 0.0))
    return (box / box.sum(dim=1, keepdim=True)).float()


def blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Each row blurred with its own sigma (0: unchanged), Pillow's box passes along rows then columns.

    Each pass repeats the edge pixels, as Pillow does (one combined 13-tap kernel would weigh the
    border differently, up to 25 levels apart). A pass is a weighted sum of shifted copies: twice
    as fast on the CPU as a grouped convolution, and exact float32 on GPUs where cuDNN uses TF32.
    """
    box = pil_blur_boxes(sigma, max_sigma).to(x.dtype)
    r = box.shape[1] // 2
    weights = [_rows(box[:, k]) for k in range(box.shape[1])]
    for dim, padding in ((3, (r, r, 0, 0)), (2, (0, 0, r, r))):
        n = x.shape[dim]
        for _ in range(BLUR_PASSES):
            padded = F.pad(x, padding, mode="replicate")
            x = padded.narrow(dim, 0, n) * weights[0]
            for k in range(1, len(weights)):
                x.addcmul_(padded.narrow(dim, k, n), weights[k])
    return x


# ---------------------------------------------------------------- for a person to look at


def augmentation_grid(paths: Sequence[str], aug: str, image_size: int, out_png: str | Path, n: int = 4,
                      seed: int = 0) -> Path:
    """Write a PNG with one row per image: ``n`` views by augment.py (PIL), then ``n`` by this module.

    Column j of both halves has the same seed, hence the same crop, flip and colour choices: the
    halves should look alike, up to rounding. Small views are enlarged (nearest) to at least 96 px.
    """
    recipe, augment, pil_view = recipe_for(aug), BatchAugment(aug, image_size), pretrain_view(aug, image_size)
    zoom = max(1, -(-96 // image_size))
    cell, pad, gap, top = image_size * zoom, 2, 12, 14
    half = n * (cell + pad)
    grid = Image.new("RGB", (2 * half + gap, top + len(paths) * (cell + pad)), "white")
    label = ImageDraw.Draw(grid)
    label.text((0, 1), f"PIL ({aug}, augment.py)", fill="black")
    label.text((half + gap, 1), f"tensor ({aug}, batch_augment.py)", fill="black")
    for row, path in enumerate(paths):
        pil_img, tensor_img = decode_with_pillow(path), decode_file(path)
        for j in range(n):
            view_seed = seed + row * n + j
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed)
                pil = pil_view(pil_img)
            generator = torch.Generator().manual_seed(view_seed)
            box = crop_box(tensor_img.shape[-2], tensor_img.shape[-1], recipe.scale, recipe.ratio, generator)
            params = draw_view_params(recipe, generator)
            tensor = augment.apply(resized_crop(tensor_img, box, image_size)[None], params[None])[0]
            for left, view in ((0, pil), (half + gap, tensor)):
                grid.paste(_denormalised(view).resize((cell, cell), Image.Resampling.NEAREST),
                           (left + j * (cell + pad), top + row * (cell + pad)))
    grid.save(out_png)
    return Path(out_png)


def _denormalised(view: torch.Tensor) -> Image.Image:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return TF.to_pil_image((view * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8))


# ---------------------------------------------------------------- GPU decoding


@dataclass
class EncodedImage:
    """What a worker returns with ``decode_on="cuda"``: the file's bytes, its size, the views' crops."""

    data: torch.Tensor  # (N,) uint8
    height: int
    width: int
    boxes: torch.Tensor | None = None  # (2, 4): top, left, h, w of each view
    image_size: int = 0  # S: the crops are resized to S x S


def read_encoded(path: str) -> EncodedImage:
    """The file's bytes and size; Pillow reads the header, for the same bad-image checks as decode_bytes."""
    data = Path(path).read_bytes()
    width, height = Image.open(io.BytesIO(data)).size
    return EncodedImage(_byte_tensor(data), height, width)


def _png(img: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    TF.to_pil_image(img).save(buffer, "PNG")
    return buffer.getvalue()


JPEG_START = [0xFF, 0xD8, 0xFF]


@dataclass
class EncodedViews:
    """A batch of `EncodedImage` in four tensors; ``.to(device)``: the (B, 2, 3, S, S) uint8 views there.

    The files' bytes travel as one tensor, not one per image: each tensor a loader worker sends
    holds a file descriptor until the batch is used (torch's file_descriptor sharing), and two per
    image ran out of them at batch 256 with 2 workers under ``ulimit -n 1024``.

    On CUDA, JPEGs are decoded by nvJPEG in one batch on a side stream (`decode_jpegs`; CI has no
    GPU, `gpu_decode_ordering_errors` is the check on one); other formats, and JPEGs nvJPEG
    refuses, on the CPU as in the workers. On the CPU every file is decoded as in the workers, to
    the same views. A file that passed the worker's header check but decodes nowhere (a truncated
    JPEG) becomes a black image with a warning: unlike the CPU path it is not replaced by the next
    image, nor counted in the bad-image report.
    """

    data: torch.Tensor  # (N,) uint8: every file's bytes, one after another
    offsets: torch.Tensor  # (B + 1,) int64: file i is data[offsets[i]:offsets[i + 1]]
    sizes: torch.Tensor  # (B, 2) int64: height, width
    boxes: torch.Tensor  # (B, 2, 4) int64: top, left, h, w of each view
    image_size: int  # S: the crops are resized to S x S

    def __len__(self) -> int:
        return len(self.sizes)

    def files(self) -> list[torch.Tensor]:
        """Each file's bytes, as views of ``data`` (no copies)."""
        bounds = self.offsets.tolist()
        return [self.data[start:end] for start, end in itertools.pairwise(bounds)]

    def pin_memory(self) -> EncodedViews:
        return self  # nvJPEG copies the bytes through pinned buffers of its own

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        files = self.files()
        decoded: list[torch.Tensor | None] = [None] * len(files)
        jpegs = [i for i, data in enumerate(files) if data[:3].tolist() == JPEG_START]
        if jpegs and device.type == "cuda":
            for i, pixels in zip(jpegs, decode_jpegs([files[i] for i in jpegs], device)):
                decoded[i] = pixels
        images = []
        for data, (height, width), pixels in zip(files, self.sizes.tolist(), decoded):
            if pixels is None:
                try:
                    pixels = decode_bytes(data.numpy().tobytes()).to(device, non_blocking=non_blocking)
                except Exception as exc:
                    warnings.warn(f"an image of {width}x{height} decodes neither on the GPU nor with "
                                  f"Pillow ({exc}); a black image stands in", RuntimeWarning, stacklevel=2)
                    pixels = torch.zeros(3, height, width, dtype=torch.uint8, device=device)
            images.append(pixels)
        return resized_crops(images, self.boxes, self.image_size)


def collate_encoded(batch: list[tuple]) -> tuple:
    """(EncodedViews, params, labels, skipped): loader.collate for TensorViews(decode_on="cuda")."""
    skipped: dict[int, Skipped] = {row: item[-1] for row, item in enumerate(batch) if item[-1]}
    params, labels = default_collate([item[1:3] for item in batch])
    images: list[EncodedImage] = [item[0] for item in batch]
    lengths = torch.tensor([0] + [len(img.data) for img in images])
    views = EncodedViews(torch.cat([img.data for img in images]), lengths.cumsum(0),
                         torch.tensor([[img.height, img.width] for img in images]),
                         torch.stack([img.boxes for img in images]), images[0].image_size)
    return views, params, labels, skipped


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream nvJPEG's outputs are allocated on: one per device, made once.

    Its pool of the caching allocator keeps about one batch of decoded images.
    """
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    return _DECODE_STREAMS[device]


def decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG files decoded by nvJPEG on ``device``, ready for the current stream (None: nvJPEG refused it).

    torchvision allocates nvJPEG's outputs from the caching allocator on the caller's current
    stream, and nvJPEG writes them without waiting for that stream's queued work
    (pytorch/vision#9606). On the training stream it can be handed a block the previous step freed
    while its backward is still queued to read it: silent corruption (19 of 20 trials on an H200).
    So we decode with a side stream current: the outputs come from that stream's own pool, whose
    blocks only ever held decoded images, and each of those returns to the pool only once the
    current stream's reads of it are done (record_stream). The current stream waits for the side
    stream on the device, not the host (torchvision has made the side stream wait for nvJPEG), so
    the crops queued after this call read finished pixels. `gpu_decode_ordering_errors` checks it.
    """
    current, side = torch.cuda.current_stream(device), decode_stream(device)
    with torch.cuda.stream(side):
        try:
            decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one JPEG that nvJPEG refuses fails all: one by one, the refused are None
            decoded = [_decode_jpeg_or_none(data, device) for data in files]
    current.wait_stream(side)
    for pixels in decoded:
        if pixels is not None:
            pixels.record_stream(current)
    return decoded


def _decode_jpeg_or_none(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def resized_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 2, 3, S, S) uint8: the crops ``boxes`` (B, 2, 4) of (3, H, W) uint8 images, as `resized_crop` does.

    On the CPU that is `resized_crop` of each crop (torchvision's uint8 resize, as in the workers).
    On a GPU torchvision resizes uint8 through float32: cast, resize, round and cast back each crop,
    then stack, about 9 kernel launches per image (2,300 at batch 256); `_resized_crops_float` does
    the same arithmetic, rounding the whole batch at once, in about 4 (1,030).
    """
    if all(img.device.type == "cpu" for img in images):
        return torch.stack([torch.stack([resized_crop(img, box, size) for box in image_boxes])
                            for img, image_boxes in zip(images, boxes.tolist())])
    return _resized_crops_float(images, boxes, size)


def _resized_crops_float(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    crops = []
    for img, image_boxes in zip(images, boxes.tolist()):
        for top, left, height, width in image_boxes:
            crop = img[None, :, top:top + height, left:left + width].float()  # contiguous, as resizes want
            if (height, width) != (size, size):  # torchvision returns a crop of the right size as it is
                crop = F.interpolate(crop, size=[size, size], mode="bilinear", align_corners=False,
                                     antialias=True)
            crops.append(crop)
    return torch.cat(crops).round_().to(torch.uint8).unflatten(0, (len(images), 2))


def gpu_decode_ordering_errors(device: torch.device | str, trials: int = 20) -> int:
    """How many of ``trials`` queued reads of freed memory a decode by `EncodedViews.to` corrupted (0: none).

    Each trial fills buffers of a decoded image's size, queues ~10 ms of GPU work and then a sum
    of each buffer on the current stream, frees the buffers while the sums are still queued, and
    decodes as many JPEGs of that size through `EncodedViews.to`. If the decoder was handed a freed
    block and wrote it before the sum ran, the sum is wrong. The same check with torchvision's
    decode_jpeg on the current stream saw 19 of 20 trials corrupted on an H200 (20 of 20 batched).
    Needs CUDA.
    """
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    count, height, width = 4, 192, 256
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=generator)
    files = [encode_jpeg(img, quality=90) for img in noise]
    whole = torch.tensor([[0, 0, height, width]] * 2)  # both views: the whole image, resized to 64 px
    views = collate_encoded([(EncodedImage(data, height, width, whole, 64), torch.zeros(2, PARAMS), 0, ())
                             for data in files])[0]
    bad = 0
    with torch.cuda.device(device):
        views.to(device)  # the decoder's first call sets it up, outside the timed window
        torch.cuda.synchronize(device)
        for _ in range(trials):
            buffers = [torch.ones(3 * height * width, dtype=torch.uint8, device=device)
                       for _ in range(count)]
            torch.cuda.synchronize(device)
            torch.cuda._sleep(20_000_000)  # ~10 ms at 2 GHz: the queued work of a step
            sums = [buffer.sum() for buffer in buffers]
            del buffers  # freed while the sums are queued, as a step frees its activations
            views.to(device)
            torch.cuda.synchronize(device)
            bad += any(int(s) != 3 * height * width for s in sums)
    return bad
