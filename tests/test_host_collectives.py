"""Host-side values (stop flags, bad-image lists, checkpoint paths and failures) cross the ranks over
the runtime's host group with CPU tensors, never over the default group: on CUDA that is NCCL, and
every exchange there would wait for all the GPU work queued so far.

Two real gloo processes. Here every group is gloo, so the ranks get a host group apart from the
default one, as ``runtime.start`` makes beside NCCL, and each collective records the group it was
given (recorded, then run as it is: nothing is mocked).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from mauctl.config import PretrainConfig
from mauctl.data.loader import BadImages
from mauctl.engine.checkpoint import PRETRAIN_FORMAT, Checkpointer, TrainState
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import Runtime

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
               "gather_object", "scatter_object_list", "reduce", "barrier")


def _host_exchanges(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(rank, world, rank, torch.device("cpu"), torch.float32, distributed=True,
                 host_group=dist.new_group(backend="gloo"))
    calls = []

    def recorded(name: str, collective):
        def call(*args, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            calls.append({"name": name, "host_group": kwargs.get("group") is rt.host_group,
                          "devices": [t.device.type for t in tensors]})
            return collective(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, recorded(name, getattr(dist, name)))

    # what a run exchanges besides its step's tensors: stop signals, bad images, checkpoints
    rt.agreed_stop()
    bad = BadImages(Path(root) / "train", total=10, max_fraction=0.5, runtime=rt)
    bad.add({0: ((f"rank{rank}.jpg", "empty file"),)})
    count = bad.agree()
    saver = Checkpointer(RunDir(Path(root) / "run"), rt, PRETRAIN_FORMAT, PretrainConfig(),
                         {"model": torch.nn.Linear(2, 2)}, save_minutes=1e-9)
    saver.save_if_due(TrainState(epoch=1, step_in_epoch=1))  # rank 0's clock, told to every rank
    saver.resume(TrainState(), "auto")
    torch.save({"calls": calls, "bad": count}, Path(root) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 25 s on 2 busy cores
def test_stop_flags_bad_images_and_checkpoint_news_go_over_the_host_group_on_the_cpu(tmp_path):
    mp.spawn(_host_exchanges, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen["bad"] == 2  # both ranks' bad images
        calls = seen["calls"]
        assert {"all_reduce", "all_gather_object", "broadcast_object_list"} <= {c["name"] for c in calls}
        assert [c for c in calls if not c["host_group"]] == []
        assert {d for c in calls for d in c["devices"]} == {"cpu"}
