"""`mauctl pretrain` for real: torchrun workers on CPU with gloo, a real image folder, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, free_port, run_mauctl, start_mauctl

pytestmark = pytest.mark.slow


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("encoder_q", "encoder_k"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs"
    assert torch.equal(a["queue"]["keys"], b["queue"]["keys"])
    assert a["queue"]["_extra_state"] == b["queue"]["_extra_state"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert (a["epoch"], a["step_in_epoch"], a["global_step"]) == (b["epoch"], b["step_in_epoch"], b["global_step"])


def test_two_processes_train_and_fill_the_run_directory(tiny_images, tmp_path):
    out = tmp_path / "run"
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "2", "--nproc-per-node", "2",
                        "--out", str(out), "--set", "run.save_every=1", "--loss", "align2-unif2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world size 2" in result.stdout

    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 16
    assert manifest["dataset"]["classes"] == 3 and manifest["dataset"]["images"] == 48
    assert manifest["loss"] == "align2-unif2"
    config = (out / "config.toml").read_text()
    assert "queue_size = 64" in config and "align_w = 2.0" in config

    steps = records(out, "step")
    epochs = records(out, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert len(steps) == 2 * (48 // 16)  # print_freq 1: every step is logged
    for r in steps + epochs:
        assert {"epoch", "step", "lr", "loss", "align", "unif", "images_per_s"} <= set(r)
        assert r["loss"] == pytest.approx(2 * r["align"] + r["unif"], abs=1e-4)

    ckpt = load_ckpt(out / "checkpoints" / "last.pt")
    assert {"format", "encoder_q", "encoder_k", "queue", "optimizer", "scaler", "epoch", "step_in_epoch",
            "global_step", "epoch_sums", "epoch_count", "config", "arch", "world_size", "bn_splits"} == set(ckpt)
    assert ckpt["format"] == "mauctl.pretrain/2" and ckpt["epoch"] == 2 and ckpt["global_step"] == 6
    assert ckpt["queue"]["keys"].shape == (64, 32)
    assert ckpt["queue"]["_extra_state"] == (6 * 16) % 64  # the write pointer
    assert torch.allclose(ckpt["queue"]["keys"].norm(dim=1), torch.ones(64), atol=1e-5)
    assert ckpt["config"]["loss"]["align_w"] == 2.0
    assert (out / "checkpoints" / "epoch_0001.pt").exists() and (out / "checkpoints" / "epoch_0002.pt").exists()


def test_two_torchrun_agents_as_two_nodes_complete_a_run(tiny_images, tmp_path):
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(out), "--nnodes", "2",
              "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    nodes = [start_mauctl(*common, "--node-rank", str(rank), cwd=tmp_path) for rank in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outputs)
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    assert load_ckpt(out / "checkpoints" / "last.pt")["global_step"] == 3


def test_resume_after_an_epoch_is_bitwise_equal_to_an_uninterrupted_run(tiny_images, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["pretrain", str(tiny_images), *TINY, "--set", "optim.cos=true"]
    assert run_mauctl(*args, "--epochs", "2", "--out", str(straight), cwd=tmp_path).returncode == 0
    assert run_mauctl(*args, "--epochs", "1", "--out", str(resumed), cwd=tmp_path).returncode == 0
    again = run_mauctl(*args, "--epochs", "2", "--out", str(resumed), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from" in again.stdout
    assert_same_state(load_ckpt(straight / "checkpoints/last.pt"), load_ckpt(resumed / "checkpoints/last.pt"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_mid_epoch_saves_a_checkpoint_and_the_same_command_finishes_the_run(sig, tiny_images,
                                                                                          tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ["pretrain", str(tiny_images), *TINY, "--batch-size", "4", "--set", "model.queue_size=16",
            "--epochs", "2"]
    assert run_mauctl(*args, "--out", str(straight), cwd=tmp_path).returncode == 0

    proc = start_mauctl(*args, "--out", str(stopped), cwd=tmp_path)
    deadline = time.time() + 120
    while not (stopped / "metrics.jsonl").exists() or not records(stopped, "step"):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output
    status = json.loads((stopped / "status.json").read_text())
    assert status["state"] == "stopped" and status["signal"] == sig.name
    assert "death signal" not in output and "Traceback" not in output, output  # torchrun's own warning hidden
    assert output.rstrip().endswith("stopped; resume with the same command (exit status 75)"), output
    ckpt = load_ckpt(stopped / "checkpoints/last.pt")
    assert ckpt["epoch"] == 0 and 0 < ckpt["step_in_epoch"] < 12  # mid-epoch

    again = run_mauctl(*args, "--out", str(stopped), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    # per-sample seeding: the resumed run draws exactly what the uninterrupted one drew
    assert_same_state(load_ckpt(straight / "checkpoints/last.pt"), load_ckpt(stopped / "checkpoints/last.pt"))


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, through /proc (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def test_sigusr2_to_every_process_of_a_run_with_loader_workers_saves_and_stops_it(tiny_images, tmp_path):
    """As SLURM signals every process of a task before its time limit (submitit asks for SIGUSR2): the
    launcher, the worker and its data-loader processes all get it, and none may die of it."""
    out = tmp_path / "run"
    proc = start_mauctl("pretrain", str(tiny_images), *TINY, "--workers", "2", "--epochs", "20",
                        "--set", "eval.every=0", "--out", str(out), cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not records(out, "epoch"):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    processes = descendants(proc.pid)
    assert len(processes) >= 4  # launcher, worker, 2 loader workers
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["signal"] == "SIGUSR2"
    assert "Traceback" not in output and "killed by signal" not in output, output


def test_a_bf16_run_resumes_in_fp16_and_then_in_bf16_again(tiny_images, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", str(tiny_images), *TINY, "--set", "eval.every=0", "--out", str(out)]
    first = run_mauctl(*args, "--epochs", "1", "--set", "run.precision='bf16'", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert load_ckpt(out / "checkpoints/last.pt")["scaler"] == {}  # no loss scaling in bf16

    fp16 = run_mauctl(*args, "--epochs", "2", "--set", "run.precision='fp16'", cwd=tmp_path)
    assert fp16.returncode == 0, fp16.stdout + fp16.stderr
    assert "resuming from" in fp16.stdout and "fp16" in fp16.stdout
    ckpt = load_ckpt(out / "checkpoints/last.pt")
    assert ckpt["epoch"] == 2 and ckpt["scaler"]["scale"] > 0  # the loss scale fp16 started afresh

    back = run_mauctl(*args, "--epochs", "3", "--set", "run.precision='bf16'", cwd=tmp_path)
    assert back.returncode == 0, back.stdout + back.stderr
    assert load_ckpt(out / "checkpoints/last.pt")["epoch"] == 3
