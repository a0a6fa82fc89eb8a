"""Checkpoints that are never half-written and never run code when read.

Save: write a temporary file beside the target, flush, fsync, ``os.replace`` over the target,
fsync the directory. A crash at any point leaves either the old file or the new one, never a
partial one under the real name. Load: ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from mauctl.errors import RunError

LAST = "last.pt"
KEPT = re.compile(r"epoch_(\d{4,})\.pt")


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~file_mode_mask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def keep_copy(last: Path, kept: Path, replace: bool = False) -> None:
    """``kept`` becomes a second name for ``last``'s bytes (hard link; a copy where links fail).

    An existing ``kept`` stays unless ``replace``; then it is replaced atomically.
    """
    if kept.exists() and not replace:
        return
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.link")
    try:
        os.link(last, tmp)
    except OSError:
        save_atomic(load(last), kept)
        return
    os.replace(tmp, kept)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling code; RunError with the reason when it cannot be read."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        raise RunError(
            f"{path} was refused: it contains objects other than tensors and plain data "
            f"(loading it would run code). Details: {str(exc).splitlines()[0]}",
            hint="Only load checkpoints from sources you trust; mauctl never unpickles code.",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise RunError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def kept_checkpoints(run_dir: Path) -> list[Path]:
    """The kept epoch_NNNN.pt files, newest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := KEPT.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def file_mode_mask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
