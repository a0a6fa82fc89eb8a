"""The loss terms against the formulas of PRODUCT.md, written out here pair by pair in float64."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mauctl.losses import align_loss, contrastive_loss, topk_accuracy, uniform_loss


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def ref_align(q, k, alpha):
    q, k = q.double().numpy(), k.double().numpy()
    return np.mean([np.linalg.norm(q[i] - k[i]) ** alpha for i in range(len(q))])


def ref_uniform(q, keys, t, intra_batch):
    q = q.double().numpy()
    sq = []
    if keys is not None:
        for u in q:
            for v in keys.double().numpy():
                sq.append(np.sum((u - v) ** 2))
    if intra_batch:
        for i in range(len(q)):
            for j in range(i + 1, len(q)):
                sq.append(np.sum((q[i] - q[j]) ** 2))
    return math.log(np.mean(np.exp(-t * np.array(sq))))


def ref_contrastive(q, k, keys, tau):
    q, k, keys = q.double().numpy(), k.double().numpy(), keys.double().numpy()
    losses = []
    for i in range(len(q)):
        logits = np.concatenate([[q[i] @ k[i]], keys @ q[i]]) / tau
        losses.append(-(logits[0] - math.log(np.sum(np.exp(logits)))))
    return np.mean(losses)


@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0, 0.5])
def test_align_loss_is_the_mean_of_distance_to_the_alpha(alpha):
    q, k = unit_rows(16, 8, 0), unit_rows(16, 8, 1)
    assert align_loss(q, k, alpha).item() == pytest.approx(ref_align(q, k, alpha), abs=1e-5)


def test_align_loss_for_alpha_2_is_two_minus_twice_the_dot_product():
    q, k = unit_rows(10, 5, 2), unit_rows(10, 5, 3)
    expected = (2 - 2 * (q * k).sum(dim=1)).mean().item()
    assert align_loss(q, k, 2.0).item() == pytest.approx(expected, abs=1e-6)


def test_align_loss_of_identical_pairs_is_zero_with_finite_gradient():
    q = unit_rows(6, 4, 4).requires_grad_()
    loss = align_loss(q, q.detach(), 2.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("t", [2.0, 3.0, 4.0])
@pytest.mark.parametrize("intra_batch", [True, False])
def test_uniform_loss_with_queue_matches_eq_17_and_18(t, intra_batch):
    q, queue = unit_rows(12, 8, 5), unit_rows(40, 8, 6)
    got = uniform_loss(q, queue, t, intra_batch).item()
    assert got == pytest.approx(ref_uniform(q, queue, t, intra_batch), abs=1e-5)


def test_uniform_loss_counts_each_pair_of_queries_once():
    q = unit_rows(9, 3, 7)
    assert uniform_loss(q, None, 2.0, True).item() == pytest.approx(ref_uniform(q, None, 2.0, True), abs=1e-5)


def test_uniform_loss_of_antipodal_points_is_minus_4t():
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniform_loss(q, None, t=2.0).item() == pytest.approx(-8.0, abs=1e-6)


def test_uniform_loss_is_finite_where_exp_underflows():
    # exp(-t * 4) with t = 200 underflows float32 to 0; the log-sum-exp form must not give -inf.
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniform_loss(q, None, t=200.0).item() == pytest.approx(-800.0, rel=1e-6)


def test_uniform_loss_without_negatives_is_refused():
    with pytest.raises(ValueError):
        uniform_loss(unit_rows(1, 4, 0), None, 2.0, True)


@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_contrastive_loss_is_infonce_with_the_positive_first(tau):
    q, k, queue = unit_rows(8, 16, 8), unit_rows(8, 16, 9), unit_rows(32, 16, 10)
    loss, logits = contrastive_loss(q, k, queue, tau)
    assert loss.item() == pytest.approx(ref_contrastive(q, k, queue, tau), abs=1e-5)
    assert logits.shape == (8, 33)
    assert logits[:, 0] == pytest.approx(((q * k).sum(1) / tau).tolist(), abs=1e-5)


def test_losses_are_float32_under_bfloat16_autocast():
    q, k, queue = unit_rows(8, 16, 11), unit_rows(8, 16, 12), unit_rows(32, 16, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [align_loss(q.bfloat16(), k.bfloat16()), uniform_loss(q.bfloat16(), queue.bfloat16(), 3.0),
                  contrastive_loss(q.bfloat16(), k.bfloat16(), queue.bfloat16(), 0.2)[0]]
    assert all(v.dtype == torch.float32 for v in values)


def test_topk_accuracy_counts_the_target_in_the_top_k():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    acc1, acc2 = topk_accuracy(logits, torch.zeros(3, dtype=torch.long), ks=(1, 2))
    assert acc1.item() == pytest.approx(100 / 3)
    assert acc2.item() == pytest.approx(100 / 3)
    (acc3,) = topk_accuracy(logits, torch.zeros(3, dtype=torch.long), ks=(3,))
    assert acc3.item() == pytest.approx(100.0)
