"""manifest.json: what a run ran with, so a run directory alone explains its numbers."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from mauctl import __version__
from mauctl.engine.rundir import RunDir


def git_revision() -> str | None:
    """The commit of the mauctl source when it runs from a git checkout, else None."""
    source = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_manifest(run: RunDir, config: Any, runtime: Any, meta: dict[str, Any], dataset: dict[str, Any],
                   **effective: Any) -> None:
    try:
        previous = json.loads(run.manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        previous = {}
    start = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": runtime.world_size,
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "command": meta.get("argv"),
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in effective.items()},
    }
    manifest = {
        "mauctl": __version__,
        "command": meta.get("command", "pretrain"),
        "preset": meta.get("preset"),
        "loss": meta.get("loss"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": _torchvision_version(), "platform": platform.platform()},
        "git_revision": git_revision(),
        "world_size": runtime.world_size,
        "global_batch": config.optim.batch_size,
        "dataset": dataset,
        "starts": previous.get("starts", []) + [start],
    }
    manifest["created"] = previous.get("created", start["time"])
    run.write_json(run.manifest, manifest)


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__
