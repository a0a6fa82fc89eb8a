"""L_uniform per GPU, as the original computes it, on one process or many.

The original computes L_uniform on each GPU over that GPU's own queries (Eq. 17: their pairs with
the queue; Eq. 18 adds the pairs among them), one log-mean-exp per GPU, and DDP averages the
gradients over the GPUs: it optimises the mean over GPUs. The reference below is that, written
out pair by pair in float64 from the paper's formulas. mauctl must give its value and its gradient
with G BatchNorm groups on one process, and with G real gloo processes.

The gradient compared is the one reaching the encoder's output z, before q = z / ||z||: on the
sphere ||u - v||^2 = 2 - 2 u.v, and the two forms' gradients with respect to q differ only along q
itself, which the normalisation removes.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from mauctl.config import LossConfig, load_config
from mauctl.engine.runtime import Runtime
from mauctl.moco import moco_losses

GPUS, PER_GPU, DIM, QUEUE = 4, 5, 8, 20


def per_gpu_uniformity(q: torch.Tensor, queue: torch.Tensor, t: float, intra_batch: bool, gpus: int) -> torch.Tensor:
    """mean over GPUs g of log mean over (q_g x queue, and each pair i < j of q_g) of exp(-t ||x - y||^2)."""
    per_gpu = []
    for q_g in q.chunk(gpus):
        sq = [((u - v) ** 2).sum() for u in q_g for v in queue]
        if intra_batch:
            sq += [((q_g[i] - q_g[j]) ** 2).sum() for i in range(len(q_g)) for j in range(i + 1, len(q_g))]
        per_gpu.append(torch.log(torch.exp(-t * torch.stack(sq)).mean()))
    return torch.stack(per_gpu).mean()


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def inputs():
    """The encoder's outputs for GPUS x PER_GPU queries, their (unit) keys and a queue, in float64."""
    return rows(GPUS * PER_GPU, 0), F.normalize(rows(GPUS * PER_GPU, 1), dim=1), F.normalize(rows(QUEUE, 2), dim=1)


def reference(z, queue, t, intra_batch, gpus=GPUS):
    """The reference's value and its gradient with respect to the queries' features z."""
    z = z.clone().requires_grad_()
    value = per_gpu_uniformity(F.normalize(z, dim=1), queue, t, intra_batch, gpus)
    (grad,) = torch.autograd.grad(value, z)
    return value.item(), grad


def mauctl_uniformity(z, k, queue, cfg, bn_groups):
    """moco_losses' L_uniform on the normalised z, and its gradient with respect to z."""
    z = z.clone().requires_grad_()
    value = moco_losses(F.normalize(z, dim=1), k, queue, cfg, bn_groups=bn_groups)["unif"]
    (grad,) = torch.autograd.grad(value, z)
    return value, grad


@pytest.mark.parametrize("intra_batch", [True, False])
def test_one_process_with_four_bn_groups_computes_the_original_on_four_gpus(intra_batch):
    z, k, queue = inputs()
    cfg = LossConfig(align_w=3.0, unif_w=1.0, unif_t=3.0, intra_batch=intra_batch)
    assert cfg.unif_groups == "bn"  # the default
    want, want_grad = reference(z, queue, 3.0, intra_batch)
    got, grad = mauctl_uniformity(z, k, queue, cfg, GPUS)
    assert got.dtype == torch.float64
    assert abs(got.item() - want) < 1e-10
    assert (grad - want_grad).abs().max().item() < 1e-10


@pytest.mark.parametrize("intra_batch", [True, False])
def test_the_global_form_is_one_log_mean_exp_over_the_whole_batch(intra_batch):
    z, k, queue = inputs()
    cfg = LossConfig(unif_t=2.0, intra_batch=intra_batch, unif_groups="global")
    want, want_grad = reference(z, queue, 2.0, intra_batch, gpus=1)
    got, grad = mauctl_uniformity(z, k, queue, cfg, GPUS)
    assert abs(got.item() - want) < 1e-10
    assert (grad - want_grad).abs().max().item() < 1e-10
    per_group, _ = mauctl_uniformity(z, k, queue, cfg.model_copy(update={"unif_groups": "bn"}), GPUS)
    assert abs(per_group.item() - want) > 1e-3  # the two forms differ: the tests above can tell them apart


def test_a_training_step_takes_one_uniformity_group_per_bn_group():
    """The real step (float32, a tiny ResNet-18) on one process with 4 BatchNorm groups."""
    from mauctl.pretrain import Training  # here: the gloo workers below import this module, and need less

    config = load_config("pretrain", sets=["model.arch='resnet18'", "model.small_stem=true", "data.image_size=16",
                                           "optim.batch_size=16", "model.bn_splits=4", "model.queue_size=32",
                                           "model.dim=8", "data.workers=0"], environ={}).config
    training = Training(config, Runtime(0, 1, 0, torch.device("cpu"), torch.float32, False))
    captured = []
    training.model.encoder_q.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    queue = training.model.queue.keys.clone()  # the step pushes its keys afterwards
    g = torch.Generator().manual_seed(0)
    x_q, x_k = torch.randn(16, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
    terms = training.step(x_q, x_k, torch.Generator().manual_seed(1), 1)
    q = F.normalize(captured[0].double(), dim=1)
    want = per_gpu_uniformity(q, queue.double(), config.loss.unif_t, True, gpus=4).item()
    assert terms["unif"].item() == pytest.approx(want, abs=1e-5)
    assert abs(per_gpu_uniformity(q, queue.double(), config.loss.unif_t, True, gpus=1).item() - want) > 1e-3


# ---------------------------------------------------------------- real gloo processes


def _rank_step(rank: int, world: int, splits: int, port: int, intra_batch: bool, out_dir: str) -> None:
    """One rank: its own rows of the global queries, the losses as Training.step computes them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(rank, world, rank, torch.device("cpu"), torch.float32, distributed=True)
    z_all, k_all, queue = inputs()
    per_rank = z_all.shape[0] // world
    z_local = z_all[rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_()
    q = rt.with_own_rows(F.normalize(z_local, dim=1))
    terms = moco_losses(q, k_all, queue, LossConfig(align_w=3.0, unif_w=1.0, unif_t=3.0, intra_batch=intra_batch),
                        bn_groups=world * splits)
    (terms["unif"] * world).backward()  # Training.step's scaling (DDP then divides by the world size)
    torch.save({"unif": terms["unif"].item(), "grad": z_local.grad / world}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world, splits", [(4, 1), (2, 2)], ids=["4 processes", "2 processes x 2 groups"])
def test_gloo_processes_compute_the_original_on_four_gpus(tmp_path, world, splits):
    """Every rank holds the mean over all groups; the gradient reaching its rows, once DDP has averaged, is the
    reference's. Groups are ordered (rank, BatchNorm group within the rank)."""
    mp.spawn(_rank_step, args=(world, splits, free_port(), True, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    z, _, queue = inputs()
    want, want_grad = reference(z, queue, 3.0, True)
    for r in ranks:
        assert abs(r["unif"] - want) < 1e-10
    grad = torch.cat([r["grad"] for r in ranks])
    assert (grad - want_grad).abs().max().item() < 1e-10
