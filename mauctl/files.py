"""Writing files the user keeps: whole or not at all, and never over a file mauctl did not write.

``replaced_atomically(path)`` is the one way mauctl writes a file in place (checkpoints, exports,
reports, a run's config and status): the caller writes a temporary file beside ``path``; on
success it is flushed to disk and renamed over ``path`` (``os.replace``), and the folder is synced.
A crash at any point leaves the old file or the new one, never a partial one under the real
name; the temporary name (``.<name>.<random>.tmp``) tells what an interrupted write left.

``check_new_file`` is the one check before a command writes a file the user named.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mauctl.errors import UsageError


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends cleanly it replaces ``path``.

    The temporary file exists (empty) on entry and is removed if the block raises. Its mode is an
    ordinary file's (0666 less the umask), not mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~file_mode_mask())
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_new_file(path: Path, option: str, *, ours: Callable[[Path], bool] | None = None,
                   force_flag: str | None = None, force: bool = False, make_parent: bool = False) -> None:
    """Refuse (UsageError) to write ``path`` (given as ``option``) over anything the user may want.

    An existing regular file is replaced only when ``ours(path)`` says mauctl wrote it, or with
    ``force`` (the user passed ``force_flag``). A folder, or a link or other entry without
    ``force``, is never replaced. The folder to write in must exist unless ``make_parent``.
    """
    if path.is_dir() and not path.is_symlink():
        raise UsageError(f"{option} {path} is a folder", hint="Give the path of a file to write.")
    if force and (path.is_file() or path.is_symlink()):
        return
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UsageError(f"{option} {path} exists and is not a regular file; not replacing it",
                         hint="Choose another file name.")
    if path.exists() and not (ours is not None and ours(path)):
        whose = ", and mauctl did not write it" if ours is not None else ""
        raise UsageError(f"{option} {path} already exists{whose}; not overwriting it",
                         hint=f"Pass {force_flag} to replace it, or choose another file name." if force_flag
                         else "Choose another file name, or move that file away.")
    if not make_parent and not path.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {path.parent} does not exist")


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
