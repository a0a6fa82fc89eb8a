"""The training step as a GPU runs it: no host data per step.

This machine has no GPU. The step's checks run on the CPU with tests/host_watch.py standing in
for a device (it tells host data from device data by where each tensor came from); they also run
on CUDA where there is one (not run here: skipped).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from host_watch import HostDataWatch
from mauctl.config import load_config
from mauctl.data.folder import scan_split
from mauctl.data.loader import BadImages
from mauctl.data.pipeline import TrainData
from mauctl.engine import runtime
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
