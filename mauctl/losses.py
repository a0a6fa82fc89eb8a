"""The three loss terms, as pure functions of L2-normalised feature rows.

Wang & Isola (ICML 2020), MoCo variant:

* ``align_loss``: mean over positive pairs of ||q - k||^alpha.
* ``uniform_loss``: log of the mean over negative pairs of exp(-t ||u - v||^2). The negatives
  are (each query, each key of the queue) -- Eq. 17 -- and, with ``intra_batch``, every
  unordered pair of distinct queries of the batch -- Eq. 18. Taken per group of queries and
  averaged over the groups: the original takes it per GPU.
* ``contrastive_loss``: MoCo's InfoNCE, cross-entropy of [q.k, q.queue] / tau, positive first.

Everything is computed in float32, also when the inputs come from an autocast region (float64
inputs stay float64: the reference tests).
No torch.distributed here: gathering the global batch and the queue is the caller's job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def align_loss(q: torch.Tensor, k: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    with torch.autocast(q.device.type, enabled=False):
        q, k = _f32(q), _f32(k)
        if alpha == 2.0:
            # ||q - k||^2, without the square root (whose gradient is undefined at q == k)
            return (q - k).pow(2).sum(dim=1).mean()
        return (q - k).norm(p=2, dim=1).pow(alpha).mean()


def uniform_loss(
    q: torch.Tensor, keys: torch.Tensor | None = None, t: float = 2.0, intra_batch: bool = True, groups: int = 1
) -> torch.Tensor:
    """The mean over ``groups`` groups of queries of log mean exp(-t * squared distance) over the group's pairs.

    The groups are contiguous equal blocks of rows of ``q``. A group's pairs are its queries with
    every key and, with ``intra_batch``, its pairs of distinct queries: one group is what the
    original computes on one GPU, and DDP's gradient averaging optimises the mean over GPUs.
    ``groups=1`` is one log-mean-exp over all of ``q``. In log-sum-exp form: it never takes log(0).
    """
    with torch.autocast(q.device.type, enabled=False):
        q = _f32(q)
        if q.shape[0] % groups:
            raise ValueError(f"{q.shape[0]} queries do not split into {groups} equal groups")
        per_group = q.shape[0] // groups
        parts = []
        if keys is not None and keys.numel():
            parts.append(sq_dist_unit(q, _f32(keys)).reshape(groups, -1))  # a group's rows are contiguous
        if intra_batch and per_group > 1:
            by_group = q.reshape(groups, per_group, -1)
            i, j = torch.triu_indices(per_group, per_group, offset=1, device=q.device)
            parts.append(sq_dist_unit(by_group, by_group)[:, i, j])
        if not parts:
            raise ValueError("uniform_loss needs keys or at least two queries in each group (with intra_batch)")
        sq = torch.cat(parts, dim=1)
        return (torch.logsumexp(-t * sq, dim=1) - math.log(sq.shape[1])).mean()


def sq_dist_unit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances between the unit rows of ``a`` and ``b`` (batched over leading dimensions):
    ||a - b||^2 = 2 - 2 a.b, rounding below 0 clamped."""
    return (2.0 - 2.0 * a @ b.mT).clamp_min(0.0)


def contrastive_loss(
    q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor, tau: float = 0.07
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): logits[:, 0] is the positive q.k / tau, logits[:, 1:] are q.queue / tau."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, keys = _f32(q), _f32(k), _f32(keys)
        positive = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, q @ keys.T], dim=1) / tau
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels), logits


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Percent of rows whose target is among the k largest logits, for each k (tensors: no host sync)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == target.unsqueeze(1)
    return [hit[:, : min(k, kmax)].any(dim=1).float().mean() * 100.0 for k in ks]
