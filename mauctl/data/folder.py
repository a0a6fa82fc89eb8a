"""Image folders in the torchvision ImageFolder layout: ``ROOT/<split>/<class>/<image>``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mauctl.errors import UsageError
from mauctl.text import plural

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class FolderIndex:
    """The classes (sorted, as torchvision) and the (path, label) samples of one split."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]

    def summary(self) -> dict[str, object]:
        """What a run records of its dataset (manifest.json): where, how many classes and images, which classes."""
        return {"root": str(self.root.parent), "split": self.root.name, "classes": len(self.classes),
                "images": len(self.samples), "class_list_sha256": class_list_digest(self.classes)}

    @property
    def counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for _, label in self.samples:
            counts[label] += 1
        return counts


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_split(data_root: Path | str, split: str) -> FolderIndex:
    """Index ``data_root/split``; refuse a missing split, a flat folder, or classes without images."""
    data_root = Path(data_root)
    root = data_root / split
    if not data_root.is_dir():
        raise UsageError(f"data folder {data_root} does not exist or is not a directory")
    if not root.is_dir():
        flat = any(is_image(e.name) for e in os.scandir(data_root) if e.is_file())
        subdirs = sorted(e.name for e in os.scandir(data_root) if e.is_dir())
        splits = [d for d in subdirs if d in SPLITS]
        if split == "val" and splits:
            hint = (f"The linear probe measures top-1 on {data_root}/val/<class>/<image>: held-out images of "
                    f"the classes in {data_root}/{splits[0]}/, one folder per class")
        else:
            hint = f"Expected {data_root}/{split}/<class>/<image>"
            if subdirs and not flat and not splits:
                hint += (f"; {data_root} holds class-like folders ({', '.join(subdirs[:3])}"
                         f"{', …' if len(subdirs) > 3 else ''}): pass the folder above {data_root}, "
                         f"or move them under {data_root}/{split}/")
        raise UsageError(f"{root} does not exist", hint=hint + ".")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = sum(1 for e in os.scandir(root) if e.is_file() and is_image(e.name))
        raise UsageError(
            f"{root} has no class folders" + (f" ({plural(loose, 'image')} directly in it)" if loose else ""),
            hint=f"Expected {root}/<class>/<image>, one folder per class.",
        )
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        found = sorted(_images_under(root / name))
        if not found:
            empty.append(name)
        samples += [(path, label) for path in found]
    if empty:
        shown = ", ".join(empty[:20]) + (f" and {len(empty) - 20} more" if len(empty) > 20 else "")
        raise UsageError(f"{root}: {plural(len(empty), 'class folder')} without images: {shown}",
                         hint="Remove the empty folders or add images to them.")
    return FolderIndex(root, classes, samples)


def scan_split_if_present(data_root: Path | str, split: str) -> FolderIndex | None:
    """``scan_split``, or None when ``data_root`` has no such folder (pretraining's val/ is optional)."""
    return scan_split(data_root, split) if (Path(data_root) / split).is_dir() else None


def check_splits(train: FolderIndex, val: FolderIndex | None, command: str) -> None:
    """Refuse (UsageError) a train/ with one class, or a val/ whose classes are not train/'s."""
    if len(train.classes) < 2:
        why = ("a linear probe over one class has nothing to tell apart" if command == "lincls" else
               "one folder usually means DATA points one level too deep, and the linear probe that evaluates "
               "the encoder needs classes to tell apart")
        raise UsageError(
            f"{train.root} holds a single class folder ('{train.classes[0]}'): {command} needs at least 2 ({why})",
            hint=f"Expected {train.root}/<class>/<image> with one folder per class. If every image really is of one "
                 "kind, split them into 2 or more folders: self-supervised pretraining does not use the labels.",
        )
    if val is not None and val.classes != train.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UsageError(
            f"{train.root.parent}: train/ and val/ have different classes (only in train: "
            f"{', '.join(only_train[:10]) or '-'}; only in val: {', '.join(only_val[:10]) or '-'})",
            hint="A linear probe needs the same class folders in both splits"
                 + (" (pretraining reads only train/, but its probe reads val/: fix val/ or move it away)."
                    if command == "pretrain" else "."),
        )


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(folder, followlinks=True):
        found += [os.path.join(dirpath, f) for f in files if is_image(f)]
    return found


def data_root(data) -> Path:
    """The folder a data config points at: ``data.root``, or the built-in dataset's cache folder."""
    if data.root:
        return Path(data.root)
    if data.builtin == "digits":
        from mauctl.data.digits import digits_folder

        return digits_folder()
    raise UsageError("no data: give a DATA folder (data.root) or a built-in dataset (data.builtin)")


def class_list_digest(classes: list[str]) -> str:
    """sha256 of the class names, one per line (the same digest as the bundled class-list file's)."""
    import hashlib

    return hashlib.sha256(("\n".join(classes) + "\n").encode()).hexdigest()
