"""MoCo: a query encoder, its momentum copy for the keys, a queue of past keys, shuffled BatchNorm.

The losses (``mauctl.losses``) are computed here on the *global* batch: every rank gathers all
queries and keys and computes the same loss. L_uniform is taken per BatchNorm group, as the
original takes it per GPU (``loss.unif_groups``): the gathered queries are ordered (rank, group
within the rank), so one process with G groups and G processes with one group each compute the
same loss, the original's on G GPUs.

Shuffle BN: the key encoder sees the global batch in a random order, cut into the same
contiguous BatchNorm groups as the query encoder (``bn_splits`` per process, over all ranks),
so no group normalises a query together with its own positive key. On one process this is the
reference's multi-GPU shuffle emulated by SplitBatchNorm2d groups.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from mauctl.backbone import build_encoder, split_batchnorm
from mauctl.config import LossConfig, ModelConfig
from mauctl.errors import UsageError
from mauctl.losses import align_loss, contrastive_loss, topk_accuracy, uniform_loss

BN_GROUP = 32  # images per BatchNorm group: the reference's per-GPU batch (256 over 8 GPUs, 128 over 4)


def bn_splits(requested: int, per_process_batch: int) -> int:
    """BatchNorm groups per process: ``requested``, or (0 = auto) groups of about BN_GROUP images."""
    if requested:
        if per_process_batch % requested:
            raise UsageError(
                f"model.bn_splits = {requested} does not divide the per-process batch {per_process_batch}",
                hint="Use a divisor of the per-process batch, or 0 for automatic.",
            )
        return requested
    splits = max(1, per_process_batch // BN_GROUP)
    while per_process_batch % splits:
        splits -= 1
    return splits


class MoCo(nn.Module):
    def __init__(self, model: ModelConfig, bn_splits: int) -> None:
        super().__init__()
        self.encoder_q = split_batchnorm(build_encoder(model.arch, model.dim, model.mlp, model.small_stem), bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.queue = KeyQueue(model.queue_size, model.dim)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """key = m * key + (1 - m) * query, for every parameter (not the BN running statistics)."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - m)


class KeyQueue(nn.Module):
    """The last K keys of the global batches, oldest overwritten first (rows are unit vectors)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.ptr = 0  # a Python int: no device sync to read it

    def get_extra_state(self) -> int:  # the pointer goes into state_dict() beside the keys
        return self.ptr

    def set_extra_state(self, ptr: int) -> None:
        self.ptr = int(ptr)

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        n = keys.shape[0]
        size = self.keys.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the batch {n}")
        self.keys[self.ptr : self.ptr + n] = keys.to(self.keys.dtype)
        self.ptr = (self.ptr + n) % size


def shuffled_keys(
    encoder_k: nn.Module, x_k_local: torch.Tensor, runtime, generator: torch.Generator
) -> torch.Tensor:
    """Keys of the global batch, in the original order, computed on a shuffled global batch.

    The permutation comes from ``generator``, seeded identically on every rank: no broadcast. It
    is on the batch's device: a permutation drawn on the host and copied over would make the host
    wait for all the work queued on the device, every step.
    """
    x_all = runtime.gather_rows(x_k_local)
    n = x_all.shape[0]
    perm = torch.randperm(n, generator=generator, device=x_all.device)
    per_rank = n // runtime.world_size
    mine = perm[runtime.rank * per_rank : (runtime.rank + 1) * per_rank]
    with runtime.autocast():
        k_mine = F.normalize(encoder_k(x_all[mine]).float(), dim=1)
    k_shuffled = runtime.gather_rows(k_mine)
    return k_shuffled[torch.argsort(perm)]


def moco_losses(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, cfg: LossConfig,
                bn_groups: int) -> dict[str, torch.Tensor]:
    """The weighted total and each active term (float32 tensors; no host sync).

    ``bn_groups``: the BatchNorm groups of the global batch ``q``, all ranks together, in row order;
    with ``loss.unif_groups = "bn"`` L_uniform is their mean, else one over the whole batch.
    """
    out: dict[str, torch.Tensor] = {}
    total = q.new_zeros((), dtype=torch.float32)
    if cfg.contr_w:
        out["contr"], logits = contrastive_loss(q, k, queue, cfg.contr_tau)
        total = total + cfg.contr_w * out["contr"]
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        out["acc1"], out["acc5"] = topk_accuracy(logits.detach(), target)
    if cfg.align_w:
        out["align"] = align_loss(q, k, cfg.align_alpha)
        total = total + cfg.align_w * out["align"]
    if cfg.unif_w:
        groups = bn_groups if cfg.unif_groups == "bn" else 1
        out["unif"] = uniform_loss(q, queue, cfg.unif_t, cfg.intra_batch, groups)
        total = total + cfg.unif_w * out["unif"]
    return {"loss": total, **out}
