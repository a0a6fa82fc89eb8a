"""What a representation looks like during pretraining: alignment, uniformity and a kNN monitor.

The metrics are the evaluation definitions of Wang & Isola (2020), not the training losses:

    align_metric = mean over positive pairs of ||f(x) - f(y)||^2          (alpha = 2)
    unif_metric  = log mean over *all* pairs i != j of exp(-2 ||f(x_i) - f(x_j)||^2)   (t = 2)

on L2-normalised embeddings (the functions normalise what they are given: an unnormalised
feature would make both numbers meaningless), in float32, with no queue. The kNN monitor is
the weighted vote of Wu et al. (2018) used by MoCo's demos: each query's k nearest bank
features by cosine similarity vote for their class with weight exp(similarity / tau).

The metric functions are pure tensor functions; ``Monitor`` computes the embeddings, a shard
per rank, gathers them, and so gives every rank the single-process value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from mauctl.data.augment import eval_transform, pretrain_view
from mauctl.data.folder import FolderIndex
from mauctl.data.loader import SeededImages, ShardSampler, make_loader
from mauctl.engine.runtime import Runtime, derive_seed
from mauctl.losses import sq_dist_unit


def align_metric(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Mean ``||x_i - y_i||^alpha`` over the rows (positive pairs), after L2-normalising both."""
    if x.shape != y.shape or x.dim() != 2 or len(x) < 1:
        raise ValueError(f"alignment needs two (N, D) tensors of positive pairs, N >= 1; got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    return (x - y).norm(dim=1).pow(alpha).mean()


def unif_metric(x: torch.Tensor, t: float = 2.0, chunk: int = 2048) -> torch.Tensor:
    """``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over all pairs of L2-normalised rows.

    Computed block by block (``chunk`` rows at a time, so 10,000 or more embeddings fit in
    memory) as a log-sum-exp: no exp underflows to 0, so the result is never -inf.
    """
    n = len(x)
    if x.dim() != 2 or n < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings (N, D); got {tuple(x.shape)}")
    x = F.normalize(x.float(), dim=1)
    parts = []
    for start in range(0, n, chunk):
        block = x[start:start + chunk]
        sq = sq_dist_unit(block, x)
        rows = torch.arange(start, start + len(block), device=x.device)
        sq[torch.arange(len(block), device=x.device), rows] = math.inf  # i == j is not a pair
        parts.append(torch.logsumexp(-t * sq.flatten(), dim=0))
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(n * (n - 1))


def knn_top1(query: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
             num_classes: int, k: int = 200, tau: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (%) of ``query`` against ``bank`` by cosine similarity."""
    if len(bank) == 0 or len(query) == 0:
        raise ValueError("kNN needs at least one query and one bank feature")
    query, bank = F.normalize(query.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(query), chunk):
        sim, idx = (query[start:start + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=query.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / tau).exp())
        correct += (votes.argmax(dim=1) == query_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / len(query)


# ---------------------------------------------------------------- the monitor


class EvalViews:
    """Two augmented views (the training recipe) and the centre crop of one image, one seed for all three."""

    def __init__(self, aug: str, image_size: int) -> None:
        self.view = pretrain_view(aug, image_size)
        self.center = eval_transform(image_size)

    def __call__(self, img):
        return self.view(img), self.view(img), self.center(img)


@dataclass
class HeldOut:
    """The images the metrics use: ``metric`` (both views and centre crop) and the kNN ``bank`` (centre crop)."""

    metric: list[tuple[str, int]]
    bank: list[tuple[str, int]]
    source: str  # "val" or "train"
    classes: int


def held_out(train: FolderIndex, val: FolderIndex | None, images: int, bank_images: int, seed: int) -> HeldOut:
    """Fixed subsets: the metric images from val/ (or, without val/, a fifth of train/ at most) and a bank of train/.

    The same on every rank and in every epoch (chosen by ``seed`` alone). Labels of val/ are
    mapped to train/'s class indices by name; val classes unknown to train/ get no kNN vote.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "eval-subset"))
    order = torch.randperm(len(train.samples), generator=g).tolist()
    if val is not None and val.samples:
        names = {name: i for i, name in enumerate(train.classes)}
        mapped = [(path, names.get(val.classes[label], -1)) for path, label in val.samples]
        pick = torch.randperm(len(mapped), generator=g).tolist()[:images]
        metric, rest, source = [mapped[i] for i in sorted(pick)], order, "val"
    else:
        n = min(images, len(train.samples) // 5)
        metric, rest, source = [train.samples[i] for i in sorted(order[:n])], order[n:], "train"
    bank = [train.samples[i] for i in sorted(rest[:bank_images])]
    return HeldOut(metric, bank, source, len(train.classes))


class Monitor:
    """Computes the diagnostics of an encoder on a fixed held-out set; every rank gets the same numbers."""

    def __init__(self, held: HeldOut, aug: str, image_size: int, seed: int, workers: int, batch: int,
                 rt: Runtime, dim: int, knn: bool = True, k: int = 200, tau: float = 0.07) -> None:
        if len(held.metric) < 2:
            raise ValueError(f"the diagnostics need at least 2 held-out images, have {len(held.metric)}")
        self.held, self.rt, self.dim, self.workers, self.batch = held, rt, dim, workers, max(1, batch)
        self.knn, self.k, self.tau = knn and len(held.bank) > 0, k, tau
        self.metric_set = SeededImages(held.metric, EvalViews(aug, image_size))
        self.bank_set = SeededImages(held.bank, eval_transform(image_size))
        self.seed_of = lambda index: derive_seed(seed, "eval-views", index)  # the same views every epoch

    @torch.no_grad()
    def evaluate(self, encoder: nn.Module) -> dict[str, float]:
        """Metrics of ``encoder`` (put in eval mode for the duration; its mode is restored after)."""
        clock = time.perf_counter()
        was_training = encoder.training
        if self.rt.distributed:  # BatchNorm running statistics may drift apart per rank: use rank 0's
            for buffer in encoder.buffers():
                dist.broadcast(buffer, 0)
        encoder.eval()
        try:
            view1, view2, center = self._embed(encoder, self.metric_set, self.seed_of, 3)
            out = {
                "align_metric": align_metric(view1, view2).item(),
                # both views' embeddings: each view's all-pairs uniformity, averaged
                "unif_metric": ((unif_metric(view1) + unif_metric(view2)) / 2).item(),
            }
            if self.knn:
                (bank,) = self._embed(encoder, self.bank_set, None, 1)
                labels = torch.tensor([label for _, label in self.held.metric], device=center.device)
                bank_labels = torch.tensor([label for _, label in self.held.bank], device=center.device)
                known = labels >= 0
                out["knn_top1"] = knn_top1(center[known], labels[known], bank, bank_labels, self.held.classes,
                                           self.k, self.tau) if known.any() else float("nan")
        finally:
            encoder.train(was_training)
        out["eval_seconds"] = time.perf_counter() - clock
        return out

    def _embed(self, encoder: nn.Module, dataset: Dataset, seed_of, parts: int) -> Sequence[torch.Tensor]:
        """Embeddings of every image of ``dataset`` (``parts`` tensors per image), gathered in index order."""
        rt = self.rt
        sampler = ShardSampler(len(dataset), rt.rank, rt.world_size, seed_of)
        loader = make_loader(dataset, sampler, self.workers, pin_memory=rt.device.type == "cuda",
                             batch_size=self.batch, persistent=False)
        chunks: list[list[torch.Tensor]] = [[] for _ in range(parts)]
        for x, _ in loader:
            views = x if parts > 1 else [x]
            for i, v in enumerate(views):
                with rt.autocast():
                    chunks[i].append(encoder(v.to(rt.device, non_blocking=True)).float())
        out = []
        for c in chunks:
            local = torch.cat(c) if c else torch.empty(0, self.dim, device=rt.device)  # a rank may have none
            out.append(F.normalize(rt.gather_shards(local, len(dataset)), dim=1))
        return out
