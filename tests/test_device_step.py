"""The training step as a GPU runs it: no host data per step, channels_last kept, the device each process takes.

This machine has no GPU. The step's checks run on the CPU with tests/host_watch.py standing in
for a device (it tells host data from device data by where each tensor came from); they also run
on CUDA where there is one (not run here: skipped). The device selection tests fake CUDA's
answers (torch.cuda.is_available / device_count), since there is no CUDA here to ask. Nothing
else is mocked: the 2-process test runs real gloo processes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import TINY, free_port, run_mauctl
from host_watch import HostDataWatch
from mauctl.config import LaunchConfig, OptimConfig, RunConfig, load_config
from mauctl.data.folder import scan_split
from mauctl.data.loader import BadImages
from mauctl.data.pipeline import TrainData
from mauctl.engine import runtime
from mauctl.errors import UsageError
from mauctl.launch import make_plan
from mauctl.lincls import evaluate
from mauctl.pretrain import Training

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]


def single_runtime(device: str = "cpu") -> runtime.Runtime:
    return runtime.Runtime(0, 1, 0, torch.device(device), torch.float32, False)


def tiny_config(*sets: str):
    return load_config("pretrain", sets=["model.arch='resnet18'", "data.image_size=32", "optim.batch_size=16",
                                         "model.queue_size=64", "model.dim=32", "data.workers=0", *sets],
                       environ={}).config


# ---------------------------------------------------------------- no host data in the step


@pytest.mark.parametrize("device", DEVICES)
def test_a_steady_state_step_from_the_loaders_batch_makes_no_tensor_from_host_data(tiny_images, device):
    """The tensor pipeline's augmentation and the MoCo step (shuffled keys, split BatchNorm, losses,
    optimizer) after one warm-up step: nothing made from Python values meets the device's tensors.

    On the CPU the shuffle permutation cannot be seen to come from the host (host and device are one);
    on CUDA the watch sees a permutation drawn on the CPU and copied over."""
    rt = single_runtime(device)
    config = tiny_config("data.aug='v2'", "data.pipeline='tensor'", "model.bn_splits=2", "run.compile=false")
    training = Training(config, rt)
    data = TrainData(config, rt, scan_split(tiny_images, "train"))
    # the loader's batches (views, params): copied to the device as TrainData does, without blocking
    batches = [[t.to(rt.device, non_blocking=True) for t in batch[:2]] for batch, _ in zip(data.loader, range(2))]

    def step(number: int, views: torch.Tensor, params: torch.Tensor) -> None:
        x_q, x_k = data.augment.two_views(views, params)
        training.step(x_q, x_k, torch.Generator(rt.device).manual_seed(number), number)

    step(1, *batches[0])  # warm-up: constants reach the device, the optimizer makes its momentum buffers
    with HostDataWatch() as watch:
        step(2, *batches[1])
    assert watch.found == [], "\n".join(watch.found)


@pytest.mark.parametrize("device", DEVICES)
def test_lincls_validation_counts_on_the_device_and_reads_the_counts_once(device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6)).eval()
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(6, (8,)), {}) for _ in range(3)]
    batches[1][2][3] = (("val/c0/bad.jpg", "truncated"),)  # row 3 stands in for an undecodable image
    expected = [0, 0, 0]
    with torch.no_grad():
        for x, y, skipped in batches:
            kept = [r for r in range(len(y)) if r not in skipped]
            top = net(x)[kept].topk(5, dim=1).indices
            hits = top == y[kept, None]
            expected = [expected[0] + int(hits[:, :1].sum()), expected[1] + int(hits.sum()), expected[2] + len(kept)]
    rt = single_runtime(device)
    net, bad = net.to(rt.device), BadImages("val", 24, 0.5, rt)
    with HostDataWatch() as watch:  # the batches are the loader's: on the host, copied over by evaluate
        top1, top5 = evaluate(net, [(x, y.clone(), dict(s)) for x, y, s in batches], rt, bad)
    assert watch.found == [], "\n".join(watch.found)
    assert (top1, top5) == pytest.approx((100 * expected[0] / expected[2], 100 * expected[1] / expected[2]))
    assert bad.count == 1


# ---------------------------------------------------------------- channels_last kept through the step


def test_with_channels_last_every_conv_and_batchnorm_of_a_step_sees_channels_last_inputs():
    """Both encoders, split BatchNorm groups included (64 px: the last stage is 2x2, where the layouts differ)."""
    rt = single_runtime()
    training = Training(tiny_config("run.channels_last=true", "model.bn_splits=2", "data.image_size=64",
                                    "optim.batch_size=8", "model.queue_size=32"), rt)
    seen, nchw = [], []

    def check(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.append(name)
            if not args[0].is_contiguous(memory_format=torch.channels_last):
                nchw.append(name)
        return hook

    for encoder in ("encoder_q", "encoder_k"):
        for name, module in getattr(training.model, encoder).named_modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                module.register_forward_pre_hook(check(f"{encoder}.{name}"))
    g = torch.Generator().manual_seed(0)
    x_q, x_k = torch.randn(8, 3, 64, 64, generator=g), torch.randn(8, 3, 64, 64, generator=g)
    training.step(x_q, x_k, torch.Generator().manual_seed(1), 1)
    assert len(seen) == 80  # resnet18: 20 convolutions and 20 BatchNorms per encoder
    assert nchw == []


def _gather_in_group(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = runtime.Runtime(rank, world, rank, torch.device("cpu"), torch.float32, distributed=True)
    x = torch.full((2, 3, 4, 5), float(rank)).contiguous(memory_format=torch.channels_last)
    x[:, 1] += 10
    with NCHWWatch() as watch:
        gathered = rt.gather_rows(x)
    torch.save({"x": gathered, "nchw": watch.found}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


class NCHWWatch(TorchDispatchMode):
    """Records every op (in this thread) that makes a 4-d tensor in another layout than channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                self.found.append(str(func))
        return out


def test_gather_rows_keeps_channels_last_in_two_gloo_processes(tmp_path):
    """The gathered batch is channels_last, and no NCHW copy of it was made on the way."""
    mp.spawn(_gather_in_group, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["x"].is_contiguous(memory_format=torch.channels_last)
        assert got["nchw"] == []
        assert got["x"][:2, 0].eq(0).all() and got["x"][2:, 0].eq(1).all()  # rank order, values intact
        assert got["x"][:2, 1].eq(10).all() and got["x"][2:, 1].eq(11).all()


def test_cudnn_benchmark_is_switched_on_for_cuda_runs_only(monkeypatch):
    """Only the flag is set here (setting it needs no GPU); its effect, cuDNN picking the fastest
    convolution for the step's fixed shapes, needs one."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runtime.tune_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    runtime.tune_backends(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


# ---------------------------------------------------------------- which GPU each process takes (CUDA faked)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA answering as a node with ``n`` visible GPUs would: there is no CUDA here to ask."""

    def visible(n: int, env: str | None = None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        if env is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)

    return visible


@pytest.mark.parametrize("requested, visible, local_rank, expected", [
    ("cuda", 8, 3, "cuda:3"),  # torchrun on a node: one process per GPU, all GPUs visible
    ("auto", 8, 0, "cuda:0"),
    ("cuda", 1, 3, "cuda:0"),  # srun --gpus-per-task=1: each process sees its own GPU as cuda:0
    ("auto", 1, 7, "cuda:0"),
    ("cuda:1", 8, 0, "cuda:1"),  # one process, the GPU it was told
])
def test_each_process_takes_the_gpu_of_its_local_rank_or_the_only_one_it_sees(fake_cuda, requested, visible,
                                                                                local_rank, expected):
    fake_cuda(visible)
    assert runtime.resolve_device(requested, local_rank) == torch.device(expected)


def test_a_local_rank_beyond_several_visible_gpus_is_refused_with_what_is_visible(fake_cuda):
    fake_cuda(2, env="4,5")
    with pytest.raises(UsageError) as err:
        runtime.resolve_device("cuda", 3)
    text = str(err.value)
    assert "local rank 3" in text and "2 GPUs" in text and "CUDA_VISIBLE_DEVICES=4,5" in text
    assert "--gpus-per-task=1" in text  # what to do


def test_an_explicit_gpu_means_one_process_per_node_by_default(fake_cuda):
    fake_cuda(4)
    plan = make_plan(RunConfig(device="cuda:2"), LaunchConfig(), OptimConfig(batch_size=16), environ={})
    assert plan.nproc_per_node == 1 and plan.world_size == 1


@pytest.mark.parametrize("how, args, env", [
    ("launcher", ["--nproc-per-node", "2"], {}),
    ("inside torchrun", [], {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}),
])
def test_one_gpu_for_several_processes_per_node_is_a_usage_error(tiny_images, tmp_path, how, args, env):
    out = tmp_path / "run"
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--device", "cuda:0", *args, "--out", str(out),
                        cwd=tmp_path, timeout=120, **env)
    assert result.returncode == 2, result.stdout + result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert "run.device = 'cuda:0'" in text and "2 processes" in text
    assert "CUDA_VISIBLE_DEVICES" in text and "--nproc-per-node 1" in text
    assert "Traceback" not in text
    assert not out.exists()  # refused before any worker started
