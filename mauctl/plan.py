"""A sweep's plan file, ``<out>/sweep.json``: its cells, their configs, run directories and jobs.

`mauctl sweep` writes it; `mauctl status` and a second `mauctl sweep` read it. A cell is one
table cell and seed: a pretraining run, then the published protocol's linear probe on it.

    {"format": 1, "out": "/abs/runs", "created": "...", "updated": "...",
     "cells": {"v2-b256_align3-unif3": {"preset": "v2-b256", "loss": "align3-unif3", "seed": 0,
               "table": "imagenet100", "row": "v2-b256", "data": "/abs/data",
               "run": "/abs/runs/v2-b256_align3-unif3", "probe": ".../lincls/lincls", "probe_preset": "lincls",
               "config": {...resolved pretraining config...}, "digest": "sha256...",
               "commands": [["pretrain", ...], ["lincls", ...]], "steps": {"pretrain": N, "probe": M},
               "jobs": [{"executor": "slurm", "id": "4242_0", "time": "..."}]}},
     "sweeps": [{"time": "...", "argv": [...], "executor": "slurm", "submitted": ["v2-b256_align3-unif3"]}]}

The file is replaced whole (a reader sees the old plan or the new one); ``locked`` keeps two
sweeps from changing one plan at once. A finished cell is never rewritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mauctl import files
from mauctl.errors import UsageError

PLAN_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
FORMAT = 1


@dataclass
class Cell:
    id: str  # the run directory's name: <preset>_<loss>[_seed<N>]
    preset: str
    loss: str
    seed: int
    table: str | None  # "imagenet100" or "imagenet": the published table of the preset's row
    row: str | None
    data: str  # the data root (absolute)
    run: str  # the pretraining run directory (absolute)
    probe: str  # the probe's directory, <run>/lincls/<probe_preset>
    probe_preset: str
    config: dict[str, Any]  # the resolved pretraining config
    digest: str  # config_digest(config): what the run computes
    commands: list[list[str]]  # the mauctl command lines a task runs, without "mauctl"
    steps: dict[str, int]  # total optimizer steps: {"pretrain": N, "probe": M}
    jobs: list[dict[str, Any]] = field(default_factory=list)  # every submission, oldest first

    @property
    def last_job(self) -> dict[str, Any] | None:
        return self.jobs[-1] if self.jobs else None


@dataclass
class Plan:
    out: str
    cells: dict[str, Cell] = field(default_factory=dict)
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""
    updated: str = ""

    def to_json(self) -> str:
        data = {"format": FORMAT, "out": self.out, "created": self.created, "updated": self.updated,
                "cells": {k: asdict(c) for k, c in self.cells.items()}, "sweeps": self.sweeps}
        return json.dumps(data, indent=1) + "\n"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def plan_path(out: Path) -> Path:
    return out / PLAN_FILE


def is_sweep(path: Path) -> bool:
    return plan_path(path).is_file()


def read_plan(out: Path) -> Plan | None:
    """The plan in ``out``, or None when there is none; a damaged one is a UsageError naming the file."""
    path = plan_path(out)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        cells = {k: Cell(**v) for k, v in data["cells"].items()}
        return Plan(out=data["out"], cells=cells, sweeps=data.get("sweeps", []), created=data.get("created", ""),
                    updated=data.get("updated", ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a readable sweep plan ({exc})",
                         hint="It is written by `mauctl sweep`; restore it from a backup or use another --out.") \
            from None


def write_plan(plan: Plan) -> None:
    plan.updated = now()
    plan.created = plan.created or plan.updated
    files.write_text_atomically(plan_path(Path(plan.out)), plan.to_json())


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``<out>/.sweep.lock`` while a sweep reads, submits and writes the plan; refuse a second sweep."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (out / LOCK_FILE).read_text(encoding="utf-8").strip() or "another process"
            raise UsageError(f"another mauctl sweep is working on {out} ({holder})",
                             hint="Wait for it to finish (`mauctl status` shows the cells), or use another --out.") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        yield
    finally:
        os.close(fd)
