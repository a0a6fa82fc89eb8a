"""What a real SLURM (slurmctld + slurmd, tests/slurm_cluster.py) does with submitit's jobs, signals
and requeues: the facts `mauctl sweep --executor slurm` is built on, each checked for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
ROLES = ("main", "child", "grandchild")


def executor(folder: Path):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # 60 minutes: submitit counts a USR2 in the first 48 (80%, at most the limit - 10) as a preemption
    # (requeue, checkpointable or not), a later one as a time-out (requeue only a checkpointable callable).
    # The tasks import this module: the folder of the tests goes on their PYTHONPATH.
    ex.update_parameters(timeout_min=60, cpus_per_task=1,
                         slurm_setup=[f"export PYTHONPATH={HERE}${{PYTHONPATH:+:$PYTHONPATH}}"])
    return ex


# -- the job callables (run inside SLURM tasks) ---------------------------------------------------------


def task_info(x: int) -> tuple[int, str, str]:
    return x * x, os.environ["SLURM_ARRAY_TASK_ID"], os.environ["SUBMITIT_EXECUTOR"]


def note_signals(role: str, out: Path) -> None:
    """Write ``out/ROLE.SIGUSR1`` or ``.SIGUSR2`` when that signal arrives."""
    def note(signum, frame):
        (out / f"{role}.{signal.Signals(signum).name}").write_text(str(os.getpid()))
    signal.signal(signal.SIGUSR1, note)
    signal.signal(signal.SIGUSR2, note)


def start_member(role: str, out: Path, new_session: bool) -> subprocess.Popen:
    code = f"import {__name__} as t; t.family_member({role!r}, {str(out)!r})"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=new_session)


def family_member(role: str, out: str) -> None:
    """The child (which starts the grandchild in a session of its own, as torchrun starts its workers)
    or the grandchild; each notes its signals and waits for ``out/stop``."""
    out = Path(out)
    note_signals(role, out)
    kids = []
    if role == "child":
        kids.append(start_member("grandchild", out, new_session=True))
    (out / f"{role}.ready").write_text(str(os.getpid()))
    wait_for_file(out / "stop")
    for kid in kids:
        while kid.poll() is None:  # polled: a wait() interrupted by a handler could deadlock
            time.sleep(0.05)


def family(out: str) -> int | None:
    """main (the submitit task) -> child -> grandchild in a new session, plus a ``sleep`` in a new
    session with no handler. Returns the sleep's exit status (None: still alive)."""
    out = Path(out) / os.environ["SLURM_ARRAY_TASK_ID"]
    out.mkdir(parents=True)
    note_signals("main", out)
    child = start_member("child", out, new_session=False)
    bare = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (out / "main.ready").write_text(str(os.getpid()))
    wait_for_file(out / "stop")
    while child.poll() is None:
        time.sleep(0.05)
    status = bare.poll()
    bare.kill()
    return status


def wait_for_file(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)


class Resumable:
    """A checkpointable callable: its first run waits to be signalled, the run after a requeue returns."""

    def __init__(self, out: str, run: int = 0) -> None:
        self.out, self.run = out, run

    def __call__(self) -> dict:
        keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
        seen = {"run": self.run, **{k: os.environ.get(k) for k in keys}}
        with open(Path(self.out) / "runs.jsonl", "a") as f:
            f.write(json.dumps(seen) + "\n")
        if self.run == 0:
            wait_for_file(Path(self.out) / "never")  # until submitit's USR2 handler requeues and exits
        return seen

    def checkpoint(self, *args):
        (Path(self.out) / f"checkpoint.{self.run}").write_text("")
        return submitit.helpers.DelayedSubmission(Resumable(self.out, self.run + 1), *args)


def raise_a_bug(x: int) -> None:
    raise ValueError(f"a bug in the cell {x}")


# -- the tests ------------------------------------------------------------------------------------------


def test_a_job_array_of_two_tasks_runs_and_returns_its_results(slurm_cluster, tmp_path):
    jobs = executor(tmp_path).map_array(task_info, [2, 3])
    array = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array}_0", f"{array}_1"]
    assert [slurm_cluster.result(j) for j in jobs] == [(4, "0", "slurm"), (9, "1", "slurm")]
    # squeue lists ended jobs only with -t all (for MinJobAge, 300 s)
    slurm_cluster.wait_for(lambda: slurm_cluster.squeue(array) == {}, 20, "the array to leave squeue's default list")
    assert slurm_cluster.squeue(array, ended=True) == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}


def test_scancel_s_usr2_reaches_every_process_of_the_task_even_a_grandchild_in_a_new_session(slurm_cluster,
                                                                                              tmp_path):
    out = tmp_path / "signals"
    jobs = executor(tmp_path / "jobs").map_array(family, [str(out)] * 2)
    array = jobs[0].job_id.split("_")[0]
    slurm_cluster.wait_for(lambda: all((out / t / "grandchild.ready").exists() for t in "01"), 60,
                           "both tasks' grandchildren to start")

    def noted(task: str) -> set[str]:
        return {p.name for p in (out / task).glob("*.SIGUSR*")}

    # what `--signal=USR2@N` sends at a time limit, to one array task: its three processes, not the other task's
    slurm_cluster.signal(f"{array}_0", "USR2")
    every = {f"{role}.SIGUSR2" for role in ROLES}
    slurm_cluster.wait_for(lambda: noted("0") == every, 20, f"{every} in task 0; saw {noted('0')}")
    # the whole array (its id alone), another signal: both tasks
    slurm_cluster.signal(array, "USR1")
    slurm_cluster.wait_for(lambda: noted("1") == {f"{role}.SIGUSR1" for role in ROLES}, 20,
                           f"USR1 in every process of task 1; saw {noted('1')}")
    assert noted("0") == every | {f"{role}.SIGUSR1" for role in ROLES}
    for task in "01":
        (out / task / "stop").write_text("")
    # a process of the task with no handler dies of the signal (the default action)
    assert [slurm_cluster.result(j) for j in jobs] == [-signal.SIGUSR2, -signal.SIGUSR1]


def test_a_checkpointable_task_signalled_with_usr2_is_requeued_once_and_returns_from_its_second_run(
        slurm_cluster, tmp_path):
    out = tmp_path / "resumable"
    out.mkdir()
    ex = executor(tmp_path / "jobs")
    with ex.batch():  # an array, as the sweep submits: task 0 returns at once, task 1 waits
        quick = ex.submit(task_info, 5)
        job = ex.submit(Resumable(str(out)))
    slurm_cluster.wait_for(lambda: (out / "runs.jsonl").exists(), 60, "the first run")
    slurm_cluster.signal(job.job_id, "USR2")
    # submitit's handler checkpoints and runs `scontrol requeue`: back to PENDING, two minutes' BeginTime
    slurm_cluster.wait_for(lambda: slurm_cluster.job_field(job.job_id, "Reason") == "BeginTime", 20,
                           "the requeued task to wait for its BeginTime")
    assert (out / "checkpoint.0").exists()
    slurm_cluster.release(job.job_id)
    second = slurm_cluster.result(job, timeout=60)
    first = json.loads((out / "runs.jsonl").read_text().splitlines()[0])
    array, task = job.job_id.split("_")
    assert first == {**second, "run": 0, "SLURM_RESTART_COUNT": None}  # same job id, array id and task id
    assert second["run"] == 1 and second["SLURM_ARRAY_JOB_ID"] == array and second["SLURM_ARRAY_TASK_ID"] == task
    assert second["SLURM_RESTART_COUNT"] == "1"
    assert slurm_cluster.job_field(job.job_id, "Restarts") == "1"
    assert not (out / "checkpoint.1").exists()
    assert slurm_cluster.result(quick) == (25, "0", "slurm")


def test_a_task_that_raises_fails_and_is_not_requeued(slurm_cluster, tmp_path):
    job = executor(tmp_path).submit(raise_a_bug, 7)
    with pytest.raises(submitit.core.utils.FailedJobError, match="a bug in the cell 7"):
        slurm_cluster.result(job)
    time.sleep(2)  # a requeue would show by now
    assert slurm_cluster.squeue(job.job_id, ended=True) == {job.job_id: "FAILED"}
    assert slurm_cluster.job_field(job.job_id, "Restarts") == "0"
