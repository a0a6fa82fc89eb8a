"""Checkpoints that are never half-written and never run code when read.

Save: ``files.replaced_atomically`` (a temporary file beside the target, fsync, ``os.replace``).
A crash at any point leaves either the old file or the new one, never a partial one under the
real name; a write that fails (full disk, lost permission) is a RunError
that names the file and keeps the previous one. Load: ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from mauctl import files
from mauctl.engine import faults
from mauctl.errors import RunError

LAST = "last.pt"
KEPT = re.compile(r"epoch_(\d{4,})\.pt")
PARTIAL = re.compile(r"\..+\.pt\.[^.]+\.(tmp|link)")  # save_atomic's and keep_copy's temporary names


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` whole or not at all; RunError (the old file intact) when the write fails."""
    try:
        with files.replaced_atomically(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            faults.during_save(f, str(tmp))
    except BaseException as exc:
        # torch.save may report a failed write as a RuntimeError of its zip writer
        cause = exc if isinstance(exc, OSError) else exc.__context__ if isinstance(exc.__context__, OSError) else None
        if cause is not None or (isinstance(exc, RuntimeError) and "inline_container" in str(exc)):
            raise save_failed(path, cause or exc) from None
        raise


def save_failed(path: Path, exc: BaseException) -> RunError:
    kept = "the previous checkpoint there is kept" if path.exists() else "no earlier checkpoint was there"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = f"Free some space where {path.parent} is (or move the run), then resume with the same command."
    elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"Make {path.parent} writable again, then resume with the same command."
    else:
        hint = "Fix the cause, then resume with the same command."
    return RunError(f"could not write the checkpoint {path}: {reason}; {kept}", hint=hint)


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


def load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint without unpickling code; RunError with the reason when it cannot be read.

    ``mmap``: map the tensors instead of reading them (cheap to inspect a large file; zip format only).
    """
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        with warnings.catch_warnings():  # torch warns about any pickle protocol but 2 before refusing the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))  # the class or function the file would import
        name = named.group(1) if named else _pickled_callable(path)
        if name is None:  # torch's restricted unpickler met bytes that are no pickle at all
            raise RunError(f"{path} is not a readable checkpoint (not written by torch.save?)") from None
        raise RunError(
            f"{path} was refused: it contains objects other than tensors and plain data "
            f"(loading it would run code: it names {name})",
            hint="Only load checkpoints from sources you trust; mauctl never unpickles code.",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise RunError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from None
    except Exception as exc:  # a file that is no checkpoint at all makes the unpickler fail in any way
        raise RunError(f"{path} is not a readable checkpoint (not written by torch.save?): "
                       f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def _pickled_callable(path: Path) -> str | None:
    """The first class or function a plain pickle file would import, read with pickletools (nothing runs)."""
    import pickletools

    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle, or a broken one
        return None
    return None


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete what an interrupted save left in ``folder`` (``.<name>.*.tmp``, ``.<name>.*.link``); return them.

    Only mauctl writes these names, and nothing ever reads them; removing them gives the space back.
    """
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.iterdir() if PARTIAL.fullmatch(p.name)]
    for p in leftovers:
        with contextlib.suppress(OSError):
            p.unlink()
    return leftovers


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def kept_checkpoints(run_dir: Path) -> list[Path]:
    """The kept epoch_NNNN.pt files, newest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := KEPT.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]
