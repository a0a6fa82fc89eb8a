"""Image transforms: the MoCo v1 and v2 pretraining views, and the linear-probe train/eval transforms.

Every random choice comes from torch's global RNG (never ``random`` or numpy), so seeding torch
right before a call fixes the augmentation, whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("v1", "v2")

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

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def draw_sigma(self) -> float:
        return torch.empty(()).uniform_(*self.sigma).item()

    def __call__(self, img: Image.Image) -> Image.Image:
        # Pillow's GaussianBlur radius is the standard deviation.
        return img.filter(ImageFilter.GaussianBlur(radius=self.draw_sigma()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def pretrain_view(aug: str, image_size: int) -> Transform:
    """One augmented view as a normalised float CHW tensor: 'v1' (MoCo v1) or 'v2' (MoCo v2, --aug-plus)."""
    crop = T.RandomResizedCrop(image_size, scale=(0.2, 1.0))
    if aug == "v1":
        colour = [T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4)]
    elif aug == "v2":
        colour = [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5),
        ]
    else:
        raise ValueError(f"unknown augmentation {aug!r}; expected one of {', '.join(AUGMENTATIONS)}")
    return T.Compose([to_rgb, crop, *colour, T.RandomHorizontalFlip(), *_to_normalised_tensor()])


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
