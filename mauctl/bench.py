"""`mauctl bench`: how fast this machine runs a pretraining config, and where the time goes.

Three measurements, in one process on one device, with the training code itself (``pretrain.Training``
and ``data.pipeline.TrainData``), never a copy of it:

* data only: the loader's batches, moved to the device and augmented (the tensor pipeline's batched
  ops run there), no model;
* compute only: training steps on synthetic batches already on the device (the best the data
  pipeline could ever allow);
* end to end: the loader feeding the training step, as ``mauctl pretrain`` runs it.

The end-to-end / compute-only ratio says how much the data pipeline costs. Warm-up steps (loader
start, torch.compile) are left out of the rates and reported apart.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mauctl.config import PretrainConfig
from mauctl.data.folder import FolderIndex
from mauctl.data.loader import worker_count
from mauctl.text import plural
from mauctl.engine.runtime import Runtime, derive_seed, precision_name

FORMAT = "mauctl.bench/1"
WARMUP = 3


@dataclass
class Result:
    measure: str  # "data", "compute", "end-to-end"
    pipeline: str | None  # "pil" / "tensor" for what reads data, None for compute only
    images_per_s: float
    steps: int
    seconds: float
    warmup_s: float
    peak_memory_bytes: int | None  # on CUDA: the device's peak allocation during the measurement
    per_core: float | None = None  # data only: images/s per loader worker (per process when workers = 0)
    ratio: float | None = None  # images/s / compute-only images/s


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class Clock:
    """Wall time that waits for the device: the GPU runs ahead of Python."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def measure(name: str, pipeline: str | None, batches: Iterator[Any], step: Callable[[Any], None], steps: int,
            images_per_step: int, device: torch.device) -> Result:
    """Run ``step`` on WARMUP then ``steps`` batches; the rate over the last ``steps``."""
    clock = Clock(device)
    start = clock()
    for _ in range(WARMUP):
        step(next(batches))
    warm = clock()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step(next(batches))
    end = clock()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    seconds = end - warm
    return Result(name, pipeline, steps * images_per_step / seconds, steps, seconds, warm - start, peak)


def forever(make: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
    """The batches of epoch 0, 1, 2, ... one after another (a benchmark may want more than an epoch)."""
    epoch = 0
    while True:
        yield from make(epoch)
        epoch += 1


def run_bench(cfg: PretrainConfig, rt: Runtime, index: FolderIndex | None, steps: int,
              pipelines: list[str]) -> dict[str, Any]:
    """Every measurement for ``cfg`` on ``rt``'s device; the data ones only when ``index`` is given."""
    from mauctl.data.pipeline import TrainData
    from mauctl.pretrain import Training

    per_step = cfg.optim.batch_size
    training = Training(cfg, rt)
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    synthetic = [torch.randn(per_step, 3, size, size, generator=g).to(rt.device) for _ in range(2)]

    def synthetic_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield synthetic[0], synthetic[1]

    counter = itertools.count()

    def train(batch: tuple) -> None:
        x_q, x_k = batch[0], batch[1]
        i = next(counter)
        shuffle = torch.Generator(rt.device).manual_seed(derive_seed(cfg.run.seed, "bench", i))
        training.step(x_q, x_k, shuffle, i + 1)

    results = [measure("compute", None, synthetic_batches(), train, steps, per_step, rt.device)]
    if index is not None:
        for pipeline in pipelines:
            data = TrainData(cfg, rt, index, pipeline)
            results.append(measure("data", pipeline, forever(data.batches), lambda batch: None, steps, per_step,
                                   rt.device))
            results[-1].per_core = results[-1].images_per_s / max(worker_count(cfg.data.workers), 1)
            results.append(measure("end-to-end", pipeline, forever(data.batches), train, steps, per_step,
                                   rt.device))
            data.close()
    compute = results[0].images_per_s
    for r in results:
        r.ratio = r.images_per_s / compute
    return {
        "format": FORMAT,
        "machine": machine(),
        "device": str(rt.device),
        "precision": precision_name(rt.dtype),
        "compile": training.compiled,
        "channels_last": training.channels_last,
        "arch": cfg.model.arch,
        "image_size": size,
        "batch_size": per_step,
        "workers": worker_count(cfg.data.workers),
        "images": len(index.samples) if index is not None else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "results": [asdict(r) for r in results],
    }


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


def render_table(report: dict[str, Any], console) -> None:
    from rich.table import Table

    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads"
    title = (f"mauctl bench: {report['arch']} at {report['image_size']} px, batch {report['batch_size']}, "
             f"{report['precision']}{', compiled' if report['compile'] else ''}"
             f"{', channels_last' if report['channels_last'] else ''} on {report['device']} ({where}); "
             f"{plural(report['workers'], 'loader worker')}")
    table = Table(title=title, title_justify="left")
    for name in ("measure", "pipeline", "images/s", "per worker", "× compute-only", "warm-up s", "peak memory"):
        table.add_column(name, justify="left" if name in ("measure", "pipeline") else "right")
    for r in report["results"]:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
        table.add_row(r["measure"], r["pipeline"] or "synthetic", f"{r['images_per_s']:,.0f}",
                      "-" if r["per_core"] is None else f"{r['per_core']:,.0f}", f"{r['ratio']:.2f}",
                      f"{r['warmup_s']:.1f}", peak)
    console.print(table)
    notes = [f"peak process memory (RSS) {report['peak_rss_bytes'] / 2**30:.2f} GiB"]
    if report["images"] is None:
        notes.append("no DATA: only the compute is measured (give an image folder, or a preset with built-in data)")
    console.print("; ".join(notes), highlight=False, markup=False)


def sample_paths(index: FolderIndex, n: int) -> list[str]:
    """``n`` images spread over the classes (the first of every k-th class), for a picture."""
    firsts: dict[int, str] = {}
    for path, label in index.samples:
        firsts.setdefault(label, path)
    chosen = list(firsts.values())
    step = max(1, len(chosen) // n)
    return chosen[::step][:n]


def run_command(job: Any, steps: int, compare_pil: bool, as_json: bool, console: Any) -> dict[str, Any]:
    """`mauctl bench`: measure ``job`` (prepare.BenchJob) in this process and print the table or JSON."""
    from mauctl.data.pipeline import pipeline_for
    from mauctl.engine import runtime

    rt = runtime.start(job.config.run.device, job.config.run.precision)
    try:
        used = pipeline_for(job.config, rt.device.type)
        pipelines = [used] + ([{"pil": "tensor", "tensor": "pil"}[used]] if compare_pil else [])
        result = run_bench(job.config, rt, job.train, steps, pipelines)
    finally:
        rt.close()
    if as_json:
        console.file.write(render_json(result))
    else:
        render_table(result, console)
    return result


def write_augmentations(job: Any, path: Path, console: Any) -> None:
    """`mauctl bench --show-augmentations FILE.png`: PIL beside tensor views of a few of the job's images."""
    from mauctl.data.batch_augment import augmentation_grid

    paths = sample_paths(job.train, 6)
    augmentation_grid(paths, job.config.data.aug, job.config.data.image_size, path)
    console.print(f"wrote {path}: {len(paths)} images, 4 views each by the PIL recipe (left) and the tensor "
                  "pipeline (right), the same random choices column by column", highlight=False)
