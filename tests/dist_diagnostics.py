"""Run by tests/test_diagnostics.py, alone or under torchrun: the diagnostics of fixed inputs, as JSON.

Not a test module itself (pytest collects test_*.py only). Each rank computes its shard and
the Monitor gathers; the test compares what 2 ranks print with what 1 process prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mauctl.backbone import build_encoder
from mauctl.data.folder import scan_split
from mauctl.diagnostics import Monitor, align_metric, held_out, knn_top1, unif_metric
from mauctl.engine import runtime


def main(data: Path, out: Path) -> None:
    rt = runtime.start("cpu", "fp32")
    # (a) fixed embeddings, sharded as the Monitor shards images, then gathered
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(101, 16, generator=g), torch.randn(101, 16, generator=g)
    labels = torch.randint(4, (101,), generator=g)
    xs = rt.gather_shards(x[rt.rank::rt.world_size].contiguous(), len(x))
    ys = rt.gather_shards(y[rt.rank::rt.world_size].contiguous(), len(y))
    fixed = {"align": align_metric(xs, ys).item(), "unif": unif_metric(xs, chunk=17).item(),
             "knn": knn_top1(xs[:40], labels[:40], xs[40:], labels[40:], 4, k=10)}
    # (b) the Monitor on an image folder with a randomly initialised encoder (the same on every rank)
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 32, False, True)
    train, val = scan_split(data, "train"), scan_split(data, "val")
    monitor = Monitor(held_out(train, val, 10000, 50000, seed=0), "v2", 32, seed=0, workers=0, batch=5, rt=rt,
                      dim=32, k=20)
    images = monitor.evaluate(encoder)
    images.pop("eval_seconds")
    if rt.is_main:
        out.write_text(json.dumps({"world_size": rt.world_size, "fixed": fixed, "images": images}))
    rt.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
