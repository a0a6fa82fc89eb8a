"""Image transforms: the MoCo v1 and v2 pretraining views, and the linear-probe train/eval transforms.

``RECIPES`` is the one definition of the v1 and v2 parameters. `pretrain_view` builds the PIL
pipeline from it here, and data.batch_augment the tensor pipeline, which replays torchvision's
random draws in the same order: a change to a recipe changes both pipelines alike.

Every random choice comes from torch's global RNG (never ``random`` or numpy), so seeding torch
right before a call fixes the augmentation, whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit greyscale is scaled down, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        # Pillow opens 16-bit PNGs as 'I;16' or 'I' with values 0..65535; convert("L") would clip.
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray((wide >> 8).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # direct P -> RGB warns about byte transparency
    return img.convert("RGB")  # alpha is dropped, as torchvision's ImageFolder loader does


class RandomGaussianBlur:
    """Gaussian blur with sigma ~ U(sigma_min, sigma_max), drawn from torch's RNG (MoCo v2)."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def draw_sigma(self) -> float:
        return torch.empty(()).uniform_(*self.sigma).item()

    def __call__(self, img: Image.Image) -> Image.Image:
        # Pillow's GaussianBlur radius is the standard deviation.
        return img.filter(ImageFilter.GaussianBlur(radius=self.draw_sigma()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


@dataclass(frozen=True)
class Recipe:
    """The random transforms of a pretraining view, in the order they apply: crop, colour, blur, flip."""

    scale: tuple[float, float]  # RandomResizedCrop's area fraction
    ratio: tuple[float, float]  # and its aspect ratio (width / height)
    grey_p: float  # RandomGrayscale's probability
    grey_first: bool  # greyscale before the colour jitter (v1) or after it (v2)
    jitter: tuple[float, float, float, float]  # ColorJitter's brightness, contrast, saturation, hue strengths
    jitter_p: float  # 1: always, not wrapped in RandomApply (which would draw a number even at p = 1)
    blur_p: float  # 0: no blur step at all (and no draw for it)
    sigma: tuple[float, float]  # the blur's sigma, uniform in this range
    flip_p: float  # RandomHorizontalFlip's probability

    def ranges(self) -> tuple:
        """ColorJitter's (min, max) of each factor: brightness 0.4 -> (0.6, 1.4), hue 0.1 -> (-0.1, 0.1)."""
        jitter = T.ColorJitter(*self.jitter)
        return jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue


# MoCo's main_moco.py: v1 by default, v2 with --aug-plus (v1 has no blur: its sigma is never drawn).
RECIPES = {
    "v1": Recipe(scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), grey_p=0.2, grey_first=True,
                 jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, blur_p=0.0, sigma=(0.1, 2.0), flip_p=0.5),
    "v2": Recipe(scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), grey_p=0.2, grey_first=False,
                 jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, blur_p=0.5, sigma=(0.1, 2.0), flip_p=0.5),
}
AUGMENTATIONS = tuple(RECIPES)


def recipe_for(aug: str) -> Recipe:
    if aug not in RECIPES:
        raise ValueError(f"unknown augmentation {aug!r}; expected one of {', '.join(AUGMENTATIONS)}")
    return RECIPES[aug]


def pretrain_view(aug: str, image_size: int) -> Transform:
    """One augmented view as a normalised float CHW tensor: 'v1' (MoCo v1) or 'v2' (MoCo v2, --aug-plus)."""
    return view_transform(recipe_for(aug), image_size)


def view_transform(recipe: Recipe, image_size: int) -> Transform:
    """The PIL pipeline of ``recipe``: torchvision's transforms, each drawing from torch's global RNG."""
    crop = T.RandomResizedCrop(image_size, scale=recipe.scale, ratio=recipe.ratio)
    jitter = T.ColorJitter(*recipe.jitter)
    if recipe.jitter_p < 1:
        jitter = T.RandomApply([jitter], p=recipe.jitter_p)
    grey = T.RandomGrayscale(p=recipe.grey_p)
    colour = [grey, jitter] if recipe.grey_first else [jitter, grey]
    if recipe.blur_p > 0:
        colour.append(T.RandomApply([RandomGaussianBlur(recipe.sigma)], p=recipe.blur_p))
    flip = T.RandomHorizontalFlip(p=recipe.flip_p)
    return T.Compose([to_rgb, crop, *colour, flip, *_to_normalised_tensor()])


class TwoViews:
    """Two independent draws of one transform: the query and key views of MoCo."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(img), self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def lincls_train_transform(image_size: int, min_scale: float = 0.08, flip: bool = True) -> Transform:
    """main_lincls's training view: RandomResizedCrop (area fraction from ``min_scale`` to 1) and a flip."""
    return T.Compose([to_rgb, T.RandomResizedCrop(image_size, scale=(min_scale, 1.0)),
                      *([T.RandomHorizontalFlip()] if flip else []), *_to_normalised_tensor()])


def eval_transform(image_size: int) -> Transform:
    """Resize the shorter side to image_size * 256/224, then centre-crop: the ImageNet eval protocol."""
    return T.Compose([to_rgb, T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size),
                      *_to_normalised_tensor()])


def _to_normalised_tensor() -> list[Callable]:
    return [T.ToTensor(), T.Normalize(MEAN, STD)]
