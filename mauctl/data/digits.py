"""The built-in demo dataset: scikit-learn's 8x8 digits, written once as a PNG image folder.

``digits_folder()`` returns ``<cache>/digits-v1/`` in the ImageFolder layout
(``train/<digit>/<index>.png`` and ``val/<digit>/<index>.png``), so the demo runs through
exactly the same loading code as a user's own folder.

The split is fixed: for each digit in order, its sklearn indices are shuffled with one
``numpy.random.default_rng(0)`` generator and the first ``round(0.2 * n)`` go to val.
Every machine therefore gets the same split (359 val, 1438 train images).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np

from mauctl.errors import UsageError

NAME = "digits-v1"  # bump the suffix whenever the layout, scaling or split changes
SPLIT_SEED = 0
VAL_FRACTION = 0.2
SPLITS = ("train", "val")
MANIFEST = "manifest.json"


def cache_root() -> Path:
    """``$MAUCTL_CACHE``, else ``$XDG_CACHE_HOME/mauctl``, else ``~/.cache/mauctl``."""
    if os.environ.get("MAUCTL_CACHE"):
        return Path(os.environ["MAUCTL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mauctl"
    return Path.home() / ".cache" / "mauctl"


def digits_folder(cache: Path | None = None) -> Path:
    """The digits image folder under ``cache`` (default: ``cache_root()``), built on first use."""
    cache = Path(cache) if cache is not None else cache_root()
    final = cache / NAME
    if is_complete(final):
        return final
    images, targets = _load_digits()
    tmp = _make_temp_dir(cache)
    try:
        _write_folder(tmp, images, targets)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _install(tmp, final)


def is_complete(folder: Path) -> bool:
    """Trust a folder whose manifest exists and whose per-split file counts match it.

    Deliberately cheap: the PNGs are not re-read or re-hashed on every run.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all(_count_pngs(folder / split) == manifest["counts"][split] for split in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def split_indices(targets: np.ndarray) -> dict[str, list[int]]:
    """The sklearn indices of each split, sorted; stratified per class, see the module docstring."""
    rng = np.random.default_rng(SPLIT_SEED)
    val: list[int] = []
    for digit in range(10):
        members = np.flatnonzero(targets == digit)
        n_val = round(VAL_FRACTION * len(members))
        val += rng.permutation(members)[:n_val].tolist()
    val_set = set(val)
    return {"train": [i for i in range(len(targets)) if i not in val_set], "val": sorted(val)}


def to_uint8(image: np.ndarray) -> np.ndarray:
    """sklearn's 0..16 intensities to 0..255: ``round(v * 255 / 16)``."""
    table = np.array([round(v * 255 / 16) for v in range(17)], dtype=np.uint8)
    return table[np.asarray(image, dtype=np.int64)]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("the built-in demo data comes from scikit-learn, which is not installed",
                         hint="Run `pip install scikit-learn`, or pass your own image folder.") from None
    digits = load_digits()
    return digits.images, digits.target


def _make_temp_dir(cache: Path) -> Path:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{NAME}."))
    except OSError as err:
        raise UsageError(f"cannot write to the cache directory {cache}: {err.strerror or err}",
                         hint="Set MAUCTL_CACHE to a writable directory.") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be readable like any folder
    return tmp


def _write_folder(root: Path, images: np.ndarray, targets: np.ndarray) -> None:
    written: dict[str, bytes] = {}
    counts = {}
    for split, indices in split_indices(targets).items():
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True)
        for index in indices:
            rel = f"{split}/{targets[index]}/{index:05d}.png"
            written[rel] = _png_bytes(to_uint8(images[index]))
            (root / rel).write_bytes(written[rel])
        counts[split] = len(indices)
    digest = hashlib.sha256()
    for rel in sorted(written):
        digest.update(rel.encode() + b"\0" + written[rel])
    manifest = {
        "source": "sklearn.datasets.load_digits",
        "split": {"seed": SPLIT_SEED, "val_fraction": VAL_FRACTION, "stratified": True},
        "counts": counts,
        # Over sorted relative names + PNG bytes; bytes depend on the local PNG encoder,
        # so compare digests between machines only when Pillow/zlib match.
        "sha256": digest.hexdigest(),
    }
    # Written last: its presence is what marks the folder complete.
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _install(tmp: Path, final: Path) -> Path:
    """Rename ``tmp`` into place; if another process got there first, use its folder."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return final
        except OSError:
            if is_complete(final):  # another process won the race: its folder is identical
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            _move_aside(final)
    shutil.rmtree(tmp, ignore_errors=True)
    raise UsageError(f"cannot put the digits dataset in place at {final}",
                     hint="Remove that path, or set MAUCTL_CACHE to another writable directory.")


def _move_aside(folder: Path) -> None:
    """Keep a broken leftover for inspection instead of deleting it."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    try:
        os.rename(folder, folder.with_name(f"{folder.name}.broken-{stamp}"))
    except FileNotFoundError:
        pass  # someone else moved it already
    except OSError as err:
        raise UsageError(f"cannot move the broken folder {folder} aside: {err.strerror or err}",
                         hint="Remove it by hand, or set MAUCTL_CACHE to a writable directory.") from None


def _count_pngs(split_dir: Path) -> int:
    return sum(1 for class_dir in split_dir.iterdir() if class_dir.is_dir()
               for f in os.scandir(class_dir) if f.name.endswith(".png"))
