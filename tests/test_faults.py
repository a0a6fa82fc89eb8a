"""Faults the engine must survive, each one really done to a real run: torchrun workers on CPU
with gloo, real signals, real SIGKILLs, a checkpoint write that really fails half-way, a NaN
that really reaches the gradients (the last two through the test hooks of mauctl/engine/faults.py).

Every story ends the same way: the run finished by resuming is bitwise equal to one that never
stopped. Set MAUCTL_FAULT_FIGURES=<file> to collect what each fault cost (exit status, seconds
until training again, steps redone, seconds lost) as JSON lines; they are printed too (pytest -s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY, start_mauctl
from test_pretrain_run import assert_same_state

pytestmark = pytest.mark.slow

BATCH, STEPS = 8, 6  # global batch; steps per epoch over the 48 images
ARGS = [*TINY, "--batch-size", str(BATCH), "--set", "model.queue_size=16", "--epochs", "2", "--nproc-per-node", "2",
        "--set", "run.save_every=1", "--set", "eval.every=0"]
PROMPT_S = 20  # a launcher whose worker died must be gone this soon (torchrun kills stuck ones after 30 s)


class Watch:
    """One background ``mauctl pretrain`` and the records it adds to metrics.jsonl, each with the time
    this test first saw it (polled every 50 ms)."""

    def __init__(self, images: Path, run: Path, *extra: str, new_session: bool = False, **env: str) -> None:
        self.run = run
        self.skip = len(_lines(run))  # records of earlier invocations
        self.seen: list[tuple[float, dict]] = []
        self.proc = start_mauctl("pretrain", str(images), *ARGS, "--out", str(run), *extra, cwd=run.parent,
                                 new_session=new_session, **env)
        self.output = ""
        RUNNING.append(self.proc)

    def poll(self) -> None:
        lines = _lines(self.run)[self.skip + len(self.seen):]
        now = time.time()
        self.seen += [(now, json.loads(line)) for line in lines]

    def wait_for(self, predicate, what: str, after: float = 0.0) -> float:
        """The time ``predicate(record)`` first held for a record of this invocation seen after ``after``."""
        return self._wait(lambda: next((t for t, r in self.seen if t > after and predicate(r)), None), what)

    def first_step(self) -> float:
        """The time the first step after this invocation's latest "resume" record (or its start) was seen."""
        def found():
            resumes = [i for i, (_, r) in enumerate(self.seen) if r["kind"] == "resume"]
            since = self.seen[resumes[-1] + 1:] if resumes else self.seen
            return next((t for t, r in since if r["kind"] == "step"), None)
        return self._wait(found, "a training step")

    def in_second_epoch(self) -> float:
        return self.wait_for(lambda r: r["kind"] == "step" and r["epoch"] == 1, "a step of the second epoch")

    def _wait(self, found, what: str, timeout: float = 150) -> float:
        deadline = time.time() + timeout
        while True:
            self.poll()
            hit = found()
            if hit is not None:
                return hit
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"never saw {what}:\n{self.finish()}")
            time.sleep(0.05)

    def finish(self, timeout: float = 150) -> str:
        if self.proc.returncode is None:
            try:
                self.output = self.proc.communicate(timeout=timeout)[0]
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its workers die with it
                raise AssertionError(f"still running after {timeout} s:\n{self.proc.communicate()[0]}") from None
            self.ended = time.time()
            self.poll()
        return self.output

    @property
    def last_step(self) -> int:
        self.poll()
        return max((r["step"] for _, r in self.seen if r["kind"] == "step"), default=0)

    def workers(self) -> dict[int, int]:
        return worker_pids(self.proc.pid)


def _lines(run: Path) -> list[str]:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return text.splitlines()[: text.count("\n")]  # whole lines only


def worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started under ``launcher`` (from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            if b"mauctl.worker" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
            found[int(env[b"RANK"])] = int(proc.name)
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def resumed_at(watch: Watch) -> int:
    """The global step of the checkpoint an invocation resumed from (its last "resume" record)."""
    watch.poll()
    record = [r for _, r in watch.seen if r["kind"] == "resume"][-1]
    return record["epoch"] * STEPS + record["step_in_epoch"]


def step_seconds(watch: Watch) -> float:
    """Mean seconds per training step, as the workers measured it."""
    ips = [r["images_per_s"] for _, r in watch.seen if r["kind"] == "step"]
    return sum(BATCH / v for v in ips) / len(ips)


def partial_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


def figure(fault: str, exit_status: int, to_resume: float, steps_redone: int, per_step: float, **more) -> None:
    """What a fault cost: seconds from the fault until a resumed run trained again (the same command
    started at once), steps trained twice, and so the seconds lost (the two, a step costing ``per_step``)."""
    record = {"fault": fault, "exit_status": exit_status, "seconds_until_training_again": round(to_resume, 1),
              "steps_redone": steps_redone, "seconds_lost": round(to_resume + steps_redone * per_step, 1), **more}
    print("fault figures:", json.dumps(record))
    if os.environ.get("MAUCTL_FAULT_FIGURES"):
        with open(os.environ["MAUCTL_FAULT_FIGURES"], "a") as f:
            f.write(json.dumps(record) + "\n")


RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_run_left_behind():
    """A story that fails half-way must not leave its run training in the background."""
    yield
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def uninterrupted(tiny_images, tmp_path_factory) -> dict:
    """last.pt of the same run never stopped: what every story below must end with."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    watch = Watch(tiny_images, run)
    output = watch.finish()
    assert watch.proc.returncode == 0, output
    return last(run)


def test_sigusr1_to_the_launcher_a_sigkilled_process_group_and_a_sigkilled_worker_each_resume_exactly(
        tiny_images, uninterrupted, tmp_path):
    run = tmp_path / "run"

    # SIGUSR1 to the launcher (what SLURM sends before the time limit): finish the step, save, exit 75
    first = Watch(tiny_images, run)
    first.first_step()
    stop = time.time()
    first.proc.send_signal(signal.SIGUSR1)
    output = first.finish()
    assert first.proc.returncode == 75, output
    assert status(run)["state"] == "stopped" and status(run)["signal"] == "SIGUSR1"
    saved = last(run)["global_step"]
    assert saved == first.last_step and saved < 2 * STEPS

    # the same command resumes exactly there; in the second epoch the whole process group is
    # SIGKILLed: no worker outlives the launcher
    second = Watch(tiny_images, run, new_session=True)
    figure("SIGUSR1 to the launcher", 75, second.first_step() - stop, 0, step_seconds(second))
    assert resumed_at(second) == saved
    second.in_second_epoch()
    workers = second.workers()
    assert len(workers) == 2
    kill = time.time()
    os.killpg(second.proc.pid, signal.SIGKILL)
    second.finish()
    deadline = time.time() + 10
    while any(alive(pid) for pid in workers.values()):
        assert time.time() < deadline, "workers outlived their launcher"
        time.sleep(0.05)

    # the same command, with --max-restarts 1, resumes from the first epoch's checkpoint; a worker
    # SIGKILLed in the second epoch: torchrun restarts both workers, they resume from that
    # checkpoint again and finish the run
    third = Watch(tiny_images, run, "--max-restarts", "1")
    figure("whole process group SIGKILLed", -9, third.first_step() - kill, second.last_step - STEPS,
           step_seconds(third))
    assert resumed_at(third) == STEPS
    third.in_second_epoch()
    reached = third.last_step
    kill = time.time()
    os.kill(third.workers()[1], signal.SIGKILL)
    third.wait_for(lambda r: r["kind"] == "resume", "the restarted workers resuming", after=kill)
    assert resumed_at(third) == STEPS
    figure("worker SIGKILLed, --max-restarts 1", 0, third.first_step() - kill, reached - STEPS,
           step_seconds(third))
    output = third.finish()
    assert third.proc.returncode == 0, output
    assert "rank 0: lost contact with the other workers" in output and "Traceback" not in output
    assert status(run)["state"] == "finished"
    assert_same_state(uninterrupted, last(run))


def test_a_kill_within_an_epoch_loses_only_the_steps_since_the_last_timed_checkpoint(
        tiny_images, uninterrupted, tmp_path):
    run = tmp_path / "run"
    every_step = ("--set", "run.save_minutes=0.00001")  # due at every logging step (print_freq 1)

    # the whole process group SIGKILLed at the fourth step of the second epoch
    first = Watch(tiny_images, run, *every_step, new_session=True)
    first.wait_for(lambda r: r["kind"] == "step" and r["epoch"] == 1 and r["step_in_epoch"] == 4,
                   "the fourth step of the second epoch")
    kill = time.time()
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.finish()
    saved = last(run)
    # written within the epoch: at least after its third step (the fourth's write may have been cut short)
    assert saved["epoch"] == 1 and 3 <= saved["step_in_epoch"] < STEPS, saved["step_in_epoch"]

    # the same command goes on from that step, not from the epoch's start, and ends where a run
    # that never stopped does
    second = Watch(tiny_images, run, *every_step)
    figure("whole process group SIGKILLed, run.save_minutes due", -9, second.first_step() - kill,
           first.last_step - saved["global_step"], step_seconds(second))
    assert resumed_at(second) == saved["global_step"]
    output = second.finish()
    assert second.proc.returncode == 0, output
    assert_same_state(uninterrupted, last(run))


def test_a_nan_gradient_a_crash_while_saving_a_full_disk_and_a_corrupt_last_pt_never_lose_the_last_good_checkpoint(
        tiny_images, uninterrupted, tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    # a NaN gradient on rank 1 only, at global step 8 (second epoch, step 2); the loss is still finite
    first = Watch(tiny_images, run, MAUCTL_TEST_NAN_AT_STEP="8")
    output = first.finish()
    assert first.proc.returncode == 1, output
    for rank in (0, 1):  # every rank stops at that same step, none waits for the others
        assert f"rank {rank}: non-finite gradient at epoch 2, step 2 (loss" in output
    assert "grad_norm nan" in output and "Traceback" not in output
    assert status(run)["state"] == "failed" and status(run)["reason"] == "non-finite gradient"
    assert last(run)["global_step"] == STEPS  # the weights the NaN spoilt were never saved

    # resuming works; this time rank 0 is SIGKILLed half-way through writing the second epoch's
    # checkpoint (test hook), no restarts: rank 1, waiting for it, and the launcher must not hang
    second = Watch(tiny_images, run, "--resume", str(checkpoints / "last.pt"), MAUCTL_TEST_FAIL_SAVE="1:kill")
    figure("non-finite gradient", 1, second.first_step() - first.ended, 8 - STEPS, step_seconds(second))
    assert resumed_at(second) == STEPS
    output = second.finish()
    assert second.proc.returncode == 1, output
    assert "rank 0 exit code -9 (SIGKILL)" in output and "Traceback" not in output
    (partial,) = partial_files(run)  # the half-written file the crash left
    died = (checkpoints / partial).stat().st_mtime
    assert second.ended - died < PROMPT_S
    assert status(run)["state"] == "failed"
    assert last(run)["global_step"] == STEPS  # the previous checkpoint, whole

    # the next resume removes the partial file, never reads it; the disk is full at the same save
    third = Watch(tiny_images, run, MAUCTL_TEST_FAIL_SAVE="1:ENOSPC")
    figure("rank 0 SIGKILLed while saving, --max-restarts 0", 1, third.first_step() - died,
           second.last_step - STEPS, step_seconds(third), launcher_exit_seconds=round(second.ended - died, 1))
    assert resumed_at(third) == STEPS and partial_files(run) == []
    output = third.finish()
    assert "removed 1 partial file left in" in output
    assert third.proc.returncode == 1, output
    assert "could not write the checkpoint" in output and "No space left on device" in output
    assert "the previous checkpoint there is kept" in output and "Traceback" not in output
    assert status(run)["state"] == "failed"
    assert last(run)["global_step"] == STEPS and partial_files(run) == []

    # last.pt truncated by hand (a new file: epoch_0001.pt, a hard link, keeps the good bytes), and a
    # stray partial file: the resume says so and falls back to the kept checkpoint of epoch 1
    good = (checkpoints / "last.pt").read_bytes()
    (checkpoints / "last.pt").unlink()
    (checkpoints / "last.pt").write_bytes(good[: len(good) // 2])
    (checkpoints / ".last.pt.k3ep1ng0.tmp").write_bytes(good[:4096])
    fourth = Watch(tiny_images, run)
    figure("checkpoint write failed (ENOSPC)", 1, fourth.first_step() - third.ended, third.last_step - STEPS,
           step_seconds(fourth))
    output = fourth.finish()
    assert fourth.proc.returncode == 0, output
    assert "last.pt is not a readable checkpoint (truncated or corrupt?)" in output
    assert f"resuming from {checkpoints / 'epoch_0001.pt'}" in output
    assert partial_files(run) == []
    assert_same_state(uninterrupted, last(run))


# ---------------------------------------------------------------- before any worker starts, and the hooks


def test_no_room_for_a_checkpoint_is_refused_before_any_worker_starts(tiny_images, tmp_path, monkeypatch):
    from mauctl.cli import app
    from mauctl.engine import rundir

    real = shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real(p)._replace(free=100 * 2**20))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", str(tiny_images), *ARGS, "--out", str(out)])
    assert result.exit_code == 2, result.output
    # resnet18: 11.2 M parameters x 3 (two encoders, momentum) in float32, 128 MiB, and 10% to spare
    assert "only 100 MiB free" in result.output and "a checkpoint needs about 141 MiB" in result.output
    assert not out.exists()


def test_an_unwritable_run_directory_is_refused_before_any_worker_starts(tiny_images, tmp_path):
    from mauctl.cli import app

    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores permissions, but not the immutable attribute
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not available here: cannot make a directory unwritable")
        unlock = ["chattr", "-i", str(locked)]
    else:
        locked.chmod(0o555)
        unlock = ["chmod", "755", str(locked)]
    try:
        result = CliRunner().invoke(app, ["pretrain", str(tiny_images), *ARGS, "--out", str(locked / "run")])
    finally:
        subprocess.run(unlock, check=True)
    assert result.exit_code == 2, result.output
    assert f"{locked} is not writable" in result.output
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("how, reason", [("ENOSPC", "No space left on device"), ("EACCES", "Permission denied")])
def test_a_save_that_fails_part_way_leaves_the_old_checkpoint_and_no_partial_file(tmp_path, monkeypatch, how, reason):
    from mauctl.engine import checkpoint, faults
    from mauctl.errors import RunError

    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"weights": torch.ones(3)}, path)
    monkeypatch.setattr(faults, "_saves", 0)
    monkeypatch.setenv(faults.FAIL_SAVE, f"1:{how}")
    with pytest.raises(RunError) as failed:
        checkpoint.save_atomic({"weights": torch.zeros(100_000)}, path)
    assert failed.value.message == (f"could not write the checkpoint {path}: {reason}; "
                                    "the previous checkpoint there is kept")
    assert torch.equal(checkpoint.load(path)["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_restarted_workers_resume_from_their_own_run_whatever_resume_says(tmp_path, monkeypatch):
    from mauctl.engine import checkpoint
    from mauctl.engine.checkpoint import PRETRAIN_FORMAT, resume_checkpoint
    from mauctl.engine.rundir import RunDir
    from mauctl.engine.runtime import Runtime

    run = RunDir(tmp_path / "run")
    checkpoint.save_atomic({"format": PRETRAIN_FORMAT, "epoch": 1}, run.last)
    (run.checkpoints / ".last.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")
    alone = Runtime(0, 1, 0, torch.device("cpu"), torch.float32, False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert resume_checkpoint(run, "none", alone, PRETRAIN_FORMAT) == (None, None)
    assert [p.name for p in run.checkpoints.iterdir()] == ["last.pt"]  # the partial file is gone
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted this worker group
    path, ckpt = resume_checkpoint(run, "none", alone, PRETRAIN_FORMAT)
    assert path == run.last and ckpt["epoch"] == 1


def test_the_nan_hook_spoils_only_the_named_step_on_the_last_rank_and_the_check_names_what_went_wrong(monkeypatch):
    from mauctl.engine import faults
    from mauctl.engine.loop import check_finite
    from mauctl.errors import RunError

    monkeypatch.setenv(faults.NAN_AT_STEP, "8")
    q = torch.ones(2, 3, requires_grad=True)
    assert faults.nan_at_step(q, 8, rank=0, world_size=2) is q and faults.nan_at_step(q, 7, 1, 2) is q
    faults.nan_at_step(q, 8, rank=1, world_size=2).sum().backward()
    assert torch.isnan(q.grad).all()  # the gradient, not the value
    monkeypatch.setenv(faults.NAN_AT_STEP, "8:loss")
    assert torch.isnan(faults.nan_at_step(q, 8, 1, 2)).all()

    with pytest.raises(RunError, match=r"non-finite gradient at epoch 2, step 3 \(loss 0.5, grad_norm nan\)"):
        check_finite({"loss": 0.5, "grad_norm": float("nan")}, 1, 3, None)
    with pytest.raises(RunError, match=r"non-finite loss at epoch 1, step 4 \(loss inf, grad_norm nan\)"):
        check_finite({"loss": float("inf"), "grad_norm": float("nan")}, 0, 4, None)


def test_the_save_clock_is_due_once_its_minutes_have_passed_and_never_when_off():
    from mauctl.engine.checkpoint import SaveClock
    from mauctl.engine.runtime import Runtime

    rt = Runtime(0, 1, 0, torch.device("cpu"), torch.float32, False)
    now = [1000.0]
    clock = SaveClock(0.5, rt, now=lambda: now[0])  # 30 s
    now[0] += 29.9
    assert not clock.due()
    now[0] += 0.1
    assert clock.due() and clock.due()  # due until a write resets it
    clock.reset()
    assert not clock.due()
    off = SaveClock(0.0, rt, now=lambda: now[0])
    now[0] += 1e9
    assert not off.due()
