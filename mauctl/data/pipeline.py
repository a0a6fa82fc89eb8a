"""One rank's training batches on its device, by either augmentation pipeline (``data.pipeline``).

"pil": augment.py's PIL recipe in the loader workers (the reference). "tensor": the workers
decode and crop, the colour / blur / flip ops run on whole batches on the device
(batch_augment.py; the same random choices as the PIL recipe). "auto": see ``pipeline_for``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mauctl.config import PretrainConfig
from mauctl.data.augment import TwoViews, pretrain_view
from mauctl.data.folder import FolderIndex
from mauctl.data.loader import EpochSampler, SeededImages, make_loader
from mauctl.engine.runtime import Runtime

TENSOR_ON_CPU_UP_TO = 64  # px: data.pipeline = "auto" picks the tensor pipeline on a CPU up to this size


def pipeline_for(cfg: PretrainConfig, device_type: str) -> str:
    """data.pipeline, with "auto" resolved to the faster one (`mauctl bench --compare-pil` measures both)."""
    if cfg.data.pipeline != "auto":
        return cfg.data.pipeline
    # On a CPU the batched ops share the cores with the model: measured 3x faster per worker than
    # PIL at 16-32 px, about as fast at 224 px (docs/performance.md).
    small = cfg.data.image_size <= TENSOR_ON_CPU_UP_TO
    return "tensor" if device_type == "cuda" or small else "pil"


class TrainData:
    """One rank's training batches on its device: (query views, key views, skipped bad images)."""

    def __init__(self, cfg: PretrainConfig, rt: Runtime, index: FolderIndex, pipeline: str | None = None) -> None:
        self.rt = rt
        self.pipeline = pipeline or pipeline_for(cfg, rt.device.type)
        self.sampler = EpochSampler(len(index.samples), cfg.optim.batch_size, rt.rank, rt.world_size, cfg.run.seed)
        pin = rt.device.type == "cuda"
        if self.pipeline == "pil":
            views = TwoViews(pretrain_view(cfg.data.aug, cfg.data.image_size))
            self.loader = make_loader(SeededImages(index.samples, views, report_skipped=True), self.sampler,
                                      cfg.data.workers, pin_memory=pin)
        else:
            from mauctl.data.batch_augment import BatchAugment, make_tensor_loader

            self.gpu_decode = cfg.data.gpu_decode and rt.device.type == "cuda"
            self.loader = make_tensor_loader(index.samples, cfg.data.aug, cfg.data.image_size, self.sampler,
                                             cfg.data.workers, pin, decode_on="cuda" if self.gpu_decode else "cpu")
            self.augment = BatchAugment(cfg.data.aug, cfg.data.image_size)

    @property
    def steps(self) -> int:
        return self.sampler.steps

    def batches(self, epoch: int, first: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """The batches of ``epoch`` from step ``first`` on."""
        self.sampler.set_epoch(epoch, first)
        device = self.rt.device
        for batch in self.loader:
            if self.pipeline == "pil":
                (x_q, x_k), _, skipped = batch
                yield x_q.to(device, non_blocking=True), x_k.to(device, non_blocking=True), skipped
            else:
                views, params, _, skipped = batch
                x_q, x_k = self.augment.two_views(views.to(device, non_blocking=True),
                                                  params.to(device, non_blocking=True))
                yield x_q, x_k, skipped

    def close(self) -> None:
        """Stop the loader's worker processes now (they are kept between epochs)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
