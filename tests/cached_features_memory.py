"""Run by tests/test_lincls.py, alone or under torchrun: the host memory the cached probe's extraction takes.

Not a test module itself (pytest collects test_*.py only). The encoder is a cheap stand-in whose
features are the image's pixels tiled ``TILES`` times: wide features at no compute, so that they
dominate the process's memory. Each rank writes ``<out>/memory-<rank>.json``: its peak RSS growth
during the extraction and the bytes of the features it holds (train views and val, as kept by the trainer).
"""

from __future__ import annotations

import gc
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from mauctl.config import DataConfig, LinclsConfig, OptimConfig, ProbeConfig, RunConfig
from mauctl.data.folder import scan_split
from mauctl.engine import runtime
from mauctl.engine.checkpoint import ProbeState
from mauctl.engine.progress import Reporter
from mauctl.engine.rundir import RunDir
from mauctl.lincls import CachedTrainer

SIZE, TILES = 16, 512


class TiledPixels(nn.Module):
    """A stand-in encoder: the image's pixels tiled ``tiles`` times, then the classifier."""

    def __init__(self, tiles: int, classes: int) -> None:
        super().__init__()
        self.tiles = tiles
        self.fc = nn.Linear(3 * SIZE * SIZE * tiles, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1).repeat(1, self.tiles))


def kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def extract(cfg: LinclsConfig, rt: runtime.Runtime, tiles: int, data: Path, out: Path) -> CachedTrainer:
    train, val = scan_split(data, "train"), scan_split(data, "val")
    probe = SimpleNamespace(model=TiledPixels(tiles, len(train.classes)).eval())
    return CachedTrainer(cfg, rt, probe, train, val, Reporter(False, "lincls", None, 1), ProbeState(), RunDir(out))


def main(data: Path, out: Path, views: int) -> None:
    rt = runtime.start("cpu", "fp32")
    out.mkdir(parents=True, exist_ok=True)
    cfg = LinclsConfig(data=DataConfig(image_size=SIZE, workers=0), lincls=ProbeConfig(cached_features=True,
                       augmented_views=views), optim=OptimConfig(batch_size=4, epochs=1), run=RunConfig(out=str(out)))
    extract(cfg, rt, 1, data, out)  # the same path with narrow features first: imports, loader, collectives
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from the current RSS
    before = kib("VmRSS")
    trainer = extract(cfg, rt, TILES, data, out)
    grown = (kib("VmHWM") - before) * 1024
    held = sum(t.numel() * t.element_size() for t in (trainer.train_x, trainer.val_x))
    (out / f"memory-{rt.rank}.json").write_text(json.dumps({"grown": grown, "features": held}))
    rt.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
