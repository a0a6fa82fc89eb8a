"""The Checkpointer: what a checkpoint holds, when it is written, and how a run resumes from it.

One process, no process group (the Runtime of a plain `python` run); the multi-process paths are
covered by the end-to-end and fault tests.
"""

from __future__ import annotations

import os

import pytest
import torch

from mauctl.config import PretrainConfig
from mauctl.engine import checkpoint
from mauctl.engine.checkpoint import PRETRAIN_FORMAT, Checkpointer, ProbeState, TrainState, upgrade
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import Runtime
from mauctl.errors import RunError
from mauctl.moco import KeyQueue

ALONE = Runtime(0, 1, 0, torch.device("cpu"), torch.float32, False)


def parts(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # a momentum buffer to save
    queue = KeyQueue(8, 3)
    queue.push(torch.randn(2, 3))
    return {"model": model, "optimizer": optimizer, "queue": queue}


def checkpointer(run: RunDir, seed: int = 0, **kwargs) -> Checkpointer:
    return Checkpointer(run, ALONE, PRETRAIN_FORMAT, PretrainConfig(), parts(seed), {"arch": "tiny"}, **kwargs)


def test_a_resumed_run_gets_back_every_part_and_its_position(tmp_path):
    run = RunDir(tmp_path / "run")
    saved = checkpointer(run, seed=1)
    state = TrainState(epoch=2, step_in_epoch=3, global_step=23, sums={"loss": 4.5}, count=3)
    saved.save(state)

    ckpt = checkpoint.load(run.last)
    assert set(ckpt) == {"format", "epoch", "step_in_epoch", "global_step", "epoch_sums", "epoch_count", "model",
                         "optimizer", "queue", "config", "arch"}
    assert ckpt["queue"]["_extra_state"] == 2 and ckpt["arch"] == "tiny"

    fresh, again = checkpointer(run, seed=2), TrainState()
    assert fresh.resume(again, "auto") == run.last
    assert again == state
    for name in ("model", "queue"):
        for key, value in saved.parts[name].state_dict().items():
            assert torch.equal(fresh.parts[name].state_dict()[key], value) if torch.is_tensor(value) \
                else fresh.parts[name].state_dict()[key] == value
    assert fresh.parts["queue"].ptr == 2
    momentum = [s["momentum_buffer"] for s in fresh.parts["optimizer"].state.values()]
    assert momentum and all(torch.equal(a, b["momentum_buffer"]) for a, b in
                            zip(momentum, saved.parts["optimizer"].state.values()))


def test_a_checkpoint_of_the_first_layout_still_resumes(tmp_path):
    queue = KeyQueue(8, 3)
    old = {"format": "mauctl.pretrain/1", "queue": queue.keys.clone(), "queue_ptr": 6, "epoch": 1}
    new = upgrade(old)
    assert new["format"] == PRETRAIN_FORMAT and "queue_ptr" not in new
    fresh = KeyQueue(8, 3)
    fresh.load_state_dict(new["queue"])
    assert fresh.ptr == 6 and torch.equal(fresh.keys, queue.keys)
    assert upgrade({"format": "mauctl.lincls/1"}) == {"format": "mauctl.lincls/1"}  # nothing else changes


def test_epoch_ends_keep_copies_and_the_best_is_a_second_name(tmp_path):
    run = RunDir(tmp_path / "run")
    saver = checkpointer(run, save_every=2, keep_best=True)
    state = ProbeState()
    for epoch in range(4):
        state.start_epoch(epoch)
        best = state.end_epoch(top1=[50.0, 70.0, 60.0, 65.0][epoch], top5=90.0, lr=0.1)
        saver.end_epoch(state, best=best)
    assert [p.name for p in run.kept()] == ["epoch_0004.pt", "epoch_0002.pt"]
    assert checkpoint.load(run.kept()[0])["epoch"] == 4
    best = checkpoint.load(run.path / "best.pt")
    assert best["epoch"] == 2 and best["summary"] == {"best_top1": 70.0, "best_epoch": 2}
    assert [h["top1"] for h in checkpoint.load(run.last)["history"]] == [50.0, 70.0, 60.0, 65.0]


def test_a_stop_writes_once_and_a_cached_probe_writes_on_bests_and_once_a_minute(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    saver = checkpointer(run, every_epoch=False)
    writes = []
    monkeypatch.setattr(checkpoint, "save_atomic", lambda obj, path: writes.append((obj["epoch"], path.name)))
    clock = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    saver.written_time = clock[0]
    state = TrainState(epoch=1)
    saver.end_epoch(state)  # a few milliseconds after the last write: nothing
    clock[0] += 61
    saver.end_epoch(state)  # a minute later: written
    saver.stopping(state)  # stopped right there: already written
    state.epoch = 2
    saver.end_epoch(state, best=True)
    saver.stopping(TrainState(epoch=2, step_in_epoch=5))  # a stop mid-epoch is always written
    assert writes == [(1, "last.pt"), (2, "last.pt"), (2, "last.pt")]


def test_resume_refuses_another_kind_of_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    checkpoint.save_atomic({"format": "mauctl.lincls/1", "epoch": 1}, run.last)
    with pytest.raises(RunError, match="is not a mauctl pretraining checkpoint"):
        checkpointer(run).resume(TrainState(), "auto")


def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    run = RunDir(tmp_path / "run")
    checkpointer(run).save(TrainState(epoch=1))
    other = Checkpointer(run, ALONE, PRETRAIN_FORMAT, PretrainConfig(), {"model": torch.nn.Linear(5, 3)})
    with pytest.raises(RunError, match="does not fit this run"):
        other.resume(TrainState(), "auto")
    assert os.path.exists(run.last)  # nothing was touched


@pytest.mark.parametrize("saved_fp16", [False, True], ids=["bf16 then fp16", "fp16 then bf16"])
def test_a_run_resumes_in_another_precision_and_an_fp16_scaler_starts_fresh(tmp_path, saved_fp16):
    # run.precision may change on resume: a run without fp16 saves its disabled GradScaler as {}
    run = RunDir(tmp_path / "run")
    old = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=saved_fp16)
    Checkpointer(run, ALONE, PRETRAIN_FORMAT, PretrainConfig(), {"scaler": old}).save(TrainState(epoch=1))

    new = torch.amp.GradScaler("cpu", enabled=not saved_fp16)
    state = TrainState()
    Checkpointer(run, ALONE, PRETRAIN_FORMAT, PretrainConfig(), {"scaler": new}).resume(state, "auto")
    assert state.epoch == 1
    fresh = torch.amp.GradScaler("cpu").state_dict()
    assert new.state_dict() == ({} if saved_fp16 else fresh)


def test_a_cpu_checkpoint_never_calls_into_cuda_and_one_with_rng_states_still_resumes(tmp_path,
                                                                                      monkeypatch):
    # There is no GPU here: CUDA is mocked as available, and any call into it fails. A --device cpu
    # run on a GPU machine must not create a CUDA context in every worker just to write a checkpoint.
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU checkpoint called into CUDA")

    run = RunDir(tmp_path / "run")
    saver = checkpointer(run)
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        for name in ("_lazy_init", "get_rng_state", "get_rng_state_all", "current_device", "synchronize"):
            patch.setattr(torch.cuda, name, no_cuda)
        saver.save(TrainState(epoch=1))
    ckpt = checkpoint.load(run.last)
    assert "rng" not in ckpt  # resume is exact without RNG states (engine/checkpoint.py says why)

    # a checkpoint written before kept torch's and Python's RNG states: it resumes as it did
    checkpoint.save_atomic({**ckpt, "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]}}, run.last)
    state = TrainState()
    assert checkpointer(run, seed=2).resume(state, "auto") == run.last and state.epoch == 1
