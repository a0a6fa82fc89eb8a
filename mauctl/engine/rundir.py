"""The run directory: what it holds, its status, and when it may be reused.

    <run>/config.toml       the resolved config (pass it back with --config to repeat the run)
    <run>/manifest.json     versions, world size, effective batch, dataset, git revision, starts
    <run>/metrics.jsonl     one JSON object per logged step and per epoch
    <run>/status.json       running / stopped / finished / failed, with the epoch and step
    <run>/checkpoints/      last.pt every epoch and every run.save_minutes within one, epoch_NNNN.pt every
                            run.save_every epochs

Nothing here deletes anything: ``--overwrite`` moves the old run aside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mauctl import files
from mauctl.config import NOT_IN_DIGEST, NOT_IN_DIGEST_SECTIONS, read_toml
from mauctl.errors import UsageError

RUN_FILES = ("config.toml", "manifest.json", "metrics.jsonl", "status.json", "checkpoints")
LAST = "last.pt"
KEPT = re.compile(r"epoch_(\d{4,})\.pt")

# Keys that may differ when a run is resumed: where and how fast it runs (the keys left out of the
# config digest) and how long; any other difference is a different run.
RESUMABLE_CHANGES = NOT_IN_DIGEST | {"optim.epochs"}
RESUMABLE_SECTIONS = NOT_IN_DIGEST_SECTIONS  # how it was launched and watched, not what it computes

MIN_FREE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    def is_run(self) -> bool:
        return self.config.exists() or self.checkpoints.is_dir()

    def has_checkpoint(self) -> bool:
        return self.last.exists() or bool(self.kept())

    def kept(self) -> list[Path]:
        """The kept checkpoints/epoch_NNNN.pt files, newest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := KEPT.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def kept_name(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        """Replace a small file whole (a reader sees the old or the new text, never a mix)."""
        files.write_text_atomically(path, json.dumps(data, indent=2) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON file of the run, or {} when it is missing or unreadable."""
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def read_status(self) -> dict[str, Any]:
        return self.read_json(self.status.name)

    def read_toml_config(self) -> dict[str, Any]:
        return read_toml(self.config)

    def set_status(self, state: str, **fields: Any) -> None:
        self.write_json(self.status, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields})

    def mark_failed(self, reason: str) -> None:
        """A run whose status still says "running" failed: say so, keeping its epoch and step (best effort)."""
        status = self.read_status()
        if status.get("state") != "running":
            return
        status.pop("time", None)
        status.pop("state")
        try:
            self.set_status("failed", **{**status, "reason": reason})
        except OSError:
            pass


def check_before_launch(run: RunDir, resume: str, overwrite: bool, differences: list[str]) -> str:
    """Decide what a run does with its directory, or refuse (UsageError) before anything starts.

    Returns "new", "resume" or "replace" (start over, moving the old run aside). ``differences``
    lists the config keys that differ from the directory's config.toml, if it has one.
    """
    path = run.path
    if resume not in ("auto", "none"):
        if overwrite:
            raise UsageError("--resume PATH and --overwrite contradict each other",
                             hint="--resume PATH continues from a checkpoint; --overwrite starts over.")
        if not Path(resume).is_file():
            raise UsageError(f"--resume {resume}: no such checkpoint file")
    if path.exists() and not path.is_dir():
        raise UsageError(f"run directory {path} exists and is not a directory", hint="Choose another --out.")
    if not path.exists() or not any(path.iterdir()):
        return "new"
    if not run.is_run():
        raise UsageError(
            f"{path} is not empty and is not a mauctl run directory; mauctl will not write into it",
            hint="Choose another --out (mauctl never overwrites files it did not create).",
        )
    if overwrite or resume == "none":
        if not overwrite:
            raise UsageError(
                f"run directory {path} already holds a run and --resume none was given",
                hint="Drop --resume none to continue it, add --overwrite to start over "
                "(the old run is moved aside, not deleted), or choose another --out.",
            )
        return "replace"
    if differences and resume == "auto":
        raise UsageError(
            f"{path} holds a run with a different configuration: " + "; ".join(differences),
            hint="Use another --out for a new run, or --overwrite to start over in this one "
            "(the old run is moved aside, not deleted).",
        )
    return "resume" if run.has_checkpoint() or resume != "auto" else "new"


def config_differences(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[str]:
    diffs = []
    for section in sorted(set(old) | set(new)):
        if section in RESUMABLE_SECTIONS or section == "preset":  # [preset] says where a config came from
            continue
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if f"{section}.{key}" not in RESUMABLE_CHANGES and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key} was {a.get(key)!r}, now {b.get(key)!r}")
    return diffs


def move_aside(path: Path) -> Path:
    """Rename a run directory to ``<name>.replaced-<timestamp>`` and return the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    path.rename(target)
    return target


def check_writable(path: Path, need_bytes: int = MIN_FREE_BYTES) -> None:
    """The run directory can be created and written, with room for about one checkpoint."""
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"cannot create the run directory {path}: {probe_dir} is a file, not a folder",
                         hint="Choose another --out.")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the run directory {path}: {probe_dir} is not writable",
                         hint="Choose another --out or fix the permissions.")
    free = shutil.disk_usage(probe_dir).free
    if free < need_bytes:
        raise UsageError(
            f"only {free / 2**20:.0f} MiB free under {probe_dir}; a checkpoint needs about {need_bytes / 2**20:.0f} MiB",
            hint="Free some space or choose another --out.",
        )
