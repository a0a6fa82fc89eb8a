"""Images per second on one CPU core: the PIL recipe (augment.py) against the tensor pipeline (batch_augment.py).

    .venv/bin/python benchmarks/augment_speed.py [--images 500] [--aug v2] [--sizes 224 32]

Writes synthetic 500x375 JPEGs (smooth colour fields, edges and noise, quality 90) to a temporary
folder, then times, per image (two views each, as MoCo needs):

* pil:           decode + TwoViews(pretrain_view) + collate-ready tensors (SeededImages, today's loader worker)
* tensor worker: read + decode + two crops + the choices (TensorViews: a loader worker when the batch
                 ops run on the GPU)
* tensor batch:  BatchAugment.two_views on the CPU, batches of 64 (what the GPU would do)
* tensor total:  worker + batch, both on this core

One thread (torch.set_num_threads(1)) and no loader workers, so the figures are per core.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mauctl.data.augment import TwoViews, pretrain_view
from mauctl.data.batch_augment import BatchAugment, TensorViews
from mauctl.data.loader import SeededImages


def write_jpegs(folder: Path, count: int, size=(500, 375)) -> list[tuple[str, int]]:
    rng = np.random.default_rng(0)
    width, height = size
    samples = []
    for i in range(count):
        y, x = np.mgrid[0:height, 0:width] / max(size)
        phase = rng.random(3) * 6
        pixels = np.stack([128 + 100 * np.sin(4 * x + 3 * y + p) for p in phase], axis=-1)
        pixels += rng.normal(0, 12, pixels.shape)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 60), rng.integers(0, height - 60)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 150), y0 + rng.integers(20, 150)],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = folder / f"{i:04d}.jpg"
        img.save(path, quality=90)
        samples.append((str(path), 0))
    return samples


def per_second(count: int, seconds: float) -> float:
    return count / seconds


def time_items(dataset, count: int) -> float:
    dataset[(0, 0)]  # warm up
    start = time.perf_counter()
    for index in range(count):
        dataset[(index, index)]
    return per_second(count, time.perf_counter() - start)


def time_batches(augment: BatchAugment, dataset: TensorViews, count: int, batch: int = 64) -> float:
    items = [dataset[(i % len(dataset), i)] for i in range(min(count, 256))]
    views, params = torch.stack([v for v, *_ in items]), torch.stack([p for _, p, *_ in items])
    augment.two_views(views[:batch], params[:batch])  # warm up
    done, start = 0, time.perf_counter()
    while done < count:
        rows = slice(done % len(items), done % len(items) + batch)
        done += len(views[rows])
        augment.two_views(views[rows], params[rows])
    return per_second(done, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--aug", default="v2", choices=["v1", "v2"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_jpegs(Path(tmp), args.images)
        print(f"{args.images} JPEGs of 500x375, recipe {args.aug}, one core; images/s (two views each)")
        print(f"{'size':>5} {'pil':>8} {'tensor worker':>14} {'tensor batch':>13} {'tensor total':>13}")
        for size in args.sizes:
            pil = time_items(SeededImages(samples, TwoViews(pretrain_view(args.aug, size))), args.images)
            views = TensorViews(samples, args.aug, size)
            worker = time_items(views, args.images)
            batch = time_batches(BatchAugment(args.aug, size), views, args.images)
            total = 1 / (1 / worker + 1 / batch)
            print(f"{size:>5} {pil:>8.0f} {worker:>14.0f} {batch:>13.0f} {total:>13.0f}")


if __name__ == "__main__":
    main()
