"""The MoCo layer: the queue, split BatchNorm, the momentum update, shuffled keys, global losses over ranks."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from conftest import free_port
from mauctl.backbone import SplitBatchNorm2d, build_encoder, split_batchnorm
from mauctl.config import LossConfig, ModelConfig
from mauctl.engine.runtime import Runtime
from mauctl.moco import KeyQueue, MoCo, moco_losses, shuffled_keys


def single_runtime() -> Runtime:
    return Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), dtype=torch.float32,
                   distributed=False)


def test_queue_keeps_the_last_k_keys_oldest_overwritten_first():
    queue = KeyQueue(size=6, dim=2)
    batches = [torch.full((2, 2), float(i)) for i in range(4)]
    for b in batches:
        queue.push(b)
    # 4 batches of 2 into 6 slots: the 4th batch wrapped around onto slots 0-1
    assert queue.keys[:, 0].tolist() == [3, 3, 1, 1, 2, 2]
    assert queue.ptr == 2


def test_queue_refuses_a_batch_that_does_not_divide_it():
    with pytest.raises(ValueError):
        KeyQueue(size=6, dim=2).push(torch.zeros(4, 2))


def test_split_batchnorm_normalises_each_contiguous_group_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    split = SplitBatchNorm2d(3, num_splits=2).train()
    ref_a, ref_b = nn.BatchNorm2d(3).train(), nn.BatchNorm2d(3).train()
    expected = torch.cat([ref_a(x[:4]), ref_b(x[4:])])
    assert torch.allclose(split(x), expected, atol=1e-5)
    # running statistics: the mean over the groups of what each group's BatchNorm tracked
    assert torch.allclose(split.running_mean, (ref_a.running_mean + ref_b.running_mean) / 2, atol=1e-6)
    assert torch.allclose(split.running_var, (ref_a.running_var + ref_b.running_var) / 2, atol=1e-6)


def _groups_along_channels(bn: nn.BatchNorm2d, x: torch.Tensor, s: int) -> torch.Tensor:
    """The reference math: the s groups side by side along the channels, one batch_norm over s * c channels."""
    n, c, h, w = x.shape
    grouped = x.reshape(s, n // s, c, h, w).transpose(0, 1).reshape(n // s, s * c, h, w)
    mean, var = bn.running_mean.repeat(s), bn.running_var.repeat(s)
    out = F.batch_norm(grouped, mean, var, bn.weight.repeat(s), bn.bias.repeat(s), True, bn.momentum, bn.eps)
    with torch.no_grad():
        bn.running_mean.copy_(mean.view(s, c).mean(0))
        bn.running_var.copy_(var.view(s, c).mean(0))
    return out.reshape(n // s, s, c, h, w).transpose(0, 1).reshape(n, c, h, w)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_split_batchnorm_keeps_the_layout_and_computes_the_grouped_batchnorm_in_float64(layout):
    torch.manual_seed(0)
    split = SplitBatchNorm2d(3, num_splits=4).double().train()
    with torch.no_grad():
        split.weight.uniform_(0.5, 2)
        split.bias.uniform_(-1, 1)
    reference = copy.deepcopy(split)
    for _ in range(2):  # the second pass starts from the running statistics of the first
        x = (torch.randn(8, 3, 5, 4, dtype=torch.float64) * 3 + 1).contiguous(memory_format=layout)
        x_ref = x.detach().clone().requires_grad_()
        x.requires_grad_()
        out, expected = split(x), _groups_along_channels(reference, x_ref, 4)
        assert out.is_contiguous(memory_format=layout)
        assert torch.allclose(out, expected, atol=1e-12)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-12)
        assert torch.allclose(split.weight.grad, reference.weight.grad, atol=1e-12)
        assert torch.allclose(split.bias.grad, reference.bias.grad, atol=1e-12)
        assert torch.allclose(split.running_mean, reference.running_mean, atol=1e-12)
        assert torch.allclose(split.running_var, reference.running_var, atol=1e-12)
    assert int(split.num_batches_tracked) == 2


def test_split_batchnorm_in_eval_mode_is_plain_batchnorm_and_keeps_state_dict_keys():
    model = build_encoder("resnet18", 16)
    keys = set(model.state_dict())
    split_batchnorm(model, 4)
    assert set(model.state_dict()) == keys
    assert any(isinstance(m, SplitBatchNorm2d) for m in model.modules())


def test_mlp_head_uses_the_original_key_names():
    model = build_encoder("resnet18", 32, mlp=True)
    assert model.fc[0].in_features == 512 and model.fc[2].out_features == 32
    assert {"fc.0.weight", "fc.2.weight"} <= set(model.state_dict())


def test_momentum_update_moves_the_key_encoder_towards_the_query_encoder():
    moco = MoCo(ModelConfig(arch="resnet18", dim=8, queue_size=16), bn_splits=1)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in moco.encoder_k.parameters()]
    moco.momentum_update(0.9)
    for k0, k1, q in zip(before_k, moco.encoder_k.parameters(), moco.encoder_q.parameters()):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q, atol=1e-6)


def test_shuffled_keys_come_back_in_the_original_order():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))  # no BatchNorm: order cannot matter
    x = torch.randn(8, 3, 2, 2)
    k = shuffled_keys(encoder, x, single_runtime(), torch.Generator().manual_seed(3))
    assert torch.allclose(k, F.normalize(encoder(x), dim=1), atol=1e-6)


def test_moco_losses_weights_each_active_term():
    q, k, queue = (F.normalize(torch.randn(n, 8), dim=1) for n in (4, 4, 16))
    cfg = LossConfig(contr_w=0.5, align_w=2.0, unif_w=1.0, unif_t=3.0)
    out = moco_losses(q, k, queue, cfg, bn_groups=2)
    assert out["loss"].item() == pytest.approx(
        0.5 * out["contr"].item() + 2.0 * out["align"].item() + out["unif"].item(), abs=1e-5)
    assert {"acc1", "acc5"} <= set(out)
    only_align = moco_losses(q, k, queue, LossConfig(align_w=1.0, unif_w=0.0), bn_groups=2)
    assert set(only_align) == {"align", "loss"}


# ---------------------------------------------------------------- two real processes, gloo


def _grads_in_group(rank: int, world: int, port: int, x_q: torch.Tensor, x_k: torch.Tensor, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(rank, world, rank, torch.device("cpu"), torch.float32, distributed=True)
    grads, loss = _one_step(rt, x_q, x_k, bn_splits=1)
    torch.save({"grads": grads, "loss": loss}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _one_step(rt: Runtime, x_q: torch.Tensor, x_k: torch.Tensor, bn_splits: int):
    torch.manual_seed(0)
    moco = MoCo(ModelConfig(arch="resnet18", dim=8, queue_size=32, small_stem=True), bn_splits)
    encoder_q = moco.encoder_q
    if rt.distributed:
        encoder_q = nn.parallel.DistributedDataParallel(moco.encoder_q)
    per_rank = x_q.shape[0] // rt.world_size
    mine = slice(rt.rank * per_rank, (rt.rank + 1) * per_rank)
    q_local = F.normalize(encoder_q(x_q[mine]), dim=1)
    with torch.no_grad():
        k = shuffled_keys(moco.encoder_k, x_k[mine], rt, torch.Generator().manual_seed(7))
    q = rt.with_own_rows(q_local)
    terms = moco_losses(q, k, moco.queue.keys, LossConfig(contr_w=1.0, align_w=3.0, unif_w=1.0),
                        bn_groups=bn_splits * rt.world_size)
    (terms["loss"] * rt.world_size).backward()
    grads = {n: p.grad.clone() for n, p in moco.encoder_q.named_parameters()}
    return grads, terms["loss"].item()


def test_two_processes_compute_the_loss_and_gradient_of_one_process_with_two_bn_groups(tmp_path):
    """Global-batch losses (L_uniform per group) + shuffle BN across ranks == one process whose BatchNorm has the
    ranks' groups."""
    torch.manual_seed(1)
    x_q, x_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    mp.spawn(_grads_in_group, args=(2, free_port(), x_q, x_k, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single_grads, single_loss = _one_step(single_runtime(), x_q, x_k, bn_splits=2)
    assert ranks[0]["loss"] == pytest.approx(single_loss, abs=1e-5)
    assert ranks[1]["loss"] == pytest.approx(single_loss, abs=1e-5)
    for name, g in single_grads.items():
        # DDP averaged the ranks' gradients: every rank holds the same, equal to the single process's
        assert torch.allclose(ranks[0]["grads"][name], g, atol=1e-4, rtol=1e-3), name
        assert torch.allclose(ranks[1]["grads"][name], g, atol=1e-4, rtol=1e-3), name
