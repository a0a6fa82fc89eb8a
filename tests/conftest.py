"""Shared helpers: tiny real image folders, and `mauctl` run as a real subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, classes: int = 3, per_class: int = 16, size=(40, 48), split="train",
                       fmt="JPEG", seed: int = 0) -> Path:
    """``root/split/c<i>/<n>.jpg``: noise images with one colour channel raised per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / split / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size[0], size[1], 3)) * 255).astype("uint8")
            pixels[..., c % 3] = 200
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            Image.fromarray(pixels).save(folder / f"{i:03d}.{ext}", format=fmt)
    return root


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private one-node SLURM for the session (tests/slurm_cluster.py), SLURM_CONF set meanwhile.

    Skipped where slurm-wlm and munge are missing or we are not root (.ci/run installs them).
    """
    from slurm_cluster import SlurmCluster, missing_reason

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """3 classes x 16 JPEGs of 40x48 in train/ and 3 x 4 in val/, written once per session."""
    root = tmp_path_factory.mktemp("tiny_images")
    write_image_folder(root, per_class=16)
    write_image_folder(root, per_class=4, split="val", seed=1)
    return root


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mauctl_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAUCTL_") and k not in ("RANK", "WORLD_SIZE")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra})
    return env


def run_mauctl(*args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mauctl", *args], cwd=cwd, env=mauctl_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def start_mauctl(*args: str, cwd: Path, new_session: bool = False, **env: str) -> subprocess.Popen:
    """``mauctl`` running in the background; ``new_session``: in a process group of its own (to kill it whole)."""
    return subprocess.Popen([sys.executable, "-m", "mauctl", *args], cwd=cwd, env=mauctl_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session)


# The smallest real pretraining: resnet18 at 32 px, queue of 64, global batch 16.
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--set", "model.queue_size=64",
        "--set", "model.dim=32", "--workers", "0", "--set", "run.print_freq=1", "--seed", "3"]
