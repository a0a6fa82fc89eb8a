"""`mauctl sweep --executor slurm` against a real slurmctld and slurmd (tests/slurm_cluster.py).

A 2-cell tiny sweep on the CPU: one task is signalled mid-run as a time limit would signal it
(SIGUSR2 to every process of the task, what submitit asks SLURM to send), requeues itself and
goes on from its checkpoint; both cells finish with their probe; `status` and `report` show them;
a second sweep submits nothing. A cell that fails is not requeued. Skipped without SLURM (see
the fixture), never mocked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import run_mauctl
from test_sweep import TINY_CELL, TWO_CELLS, epochs_in

from mauctl.plan import read_plan

pytestmark = pytest.mark.slow

# one CPU per task: both cells run at once on a 2-core node
SLURM_CELL = [*TINY_CELL, "--executor", "slurm", "--cpus-per-task", "1", "--time", "30"]


def job_log(out: Path, job_id: str) -> str:
    """The task's log (submitit's, with the mauctl commands' output)."""
    logs = sorted((out / ".submitit").rglob(f"{job_id}_0_log.out"))
    return logs[0].read_text(errors="replace") if logs else "(no log yet)"


def test_a_slurm_sweep_requeues_a_signalled_task_finishes_both_cells_and_submits_nothing_twice(
        tmp_path, tiny_images, slurm_cluster):
    out = tmp_path / "runs"
    args = ["sweep", str(tiny_images), *TWO_CELLS, *SLURM_CELL, "--set", "optim.epochs=8", "--out", str(out)]
    first = run_mauctl(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "0 finished, 0 queued or running, 2 to submit" in first.stdout
    plan = read_plan(out)
    jobs = {c.id: c.last_job["id"] for c in plan.cells.values()}
    signalled, other = jobs["v2-b256_contr-t0.2"], jobs["v2-b256_align3-unif3"]
    assert signalled.split("_")[0] == other.split("_")[0]  # one array, a task per cell
    run = out / "v2-b256_contr-t0.2"

    # while the pretraining runs (an epoch done), SLURM's time-limit signal to every process of the task
    slurm_cluster.wait_for(lambda: (run / "metrics.jsonl").exists() and epochs_in(run), 240,
                           f"an epoch of {run}")
    slurm_cluster.signal(signalled, "USR2")
    slurm_cluster.release(signalled)  # requeued: eligible now rather than in two minutes

    # both cells finish, the signalled one after a resume from its checkpoint, no epoch done twice
    def done() -> bool:
        states = slurm_cluster.squeue()
        return all(j not in states for j in jobs.values())

    try:
        slurm_cluster.wait_for(done, 600, "both tasks to end")
    finally:
        print(job_log(out, signalled)[-6000:])
    stopped_then = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in stopped_then if r.get("kind") == "resume"]
    assert len(resumes) == 1, job_log(out, signalled)
    assert epochs_in(run) == list(range(8))
    log = job_log(out, signalled)
    assert "Caught signal SIGUSR2" in log and "pretrain stopped by SIGUSR2" in log  # submitit, then mauctl
    assert f"Requeued job {signalled}" in log and f"resuming from {run}/checkpoints/last.pt" in log
    assert slurm_cluster.job_field(signalled, "Restarts") == "1"
    for cell in plan.cells.values():
        results = json.loads((Path(cell.probe) / "results.json").read_text())
        assert results["finished"] and 0 <= results["best_top1"] <= 100

    # status: both finished, with their job ids and probe top-1; it fits 80 columns in a pipe
    status = run_mauctl("status", str(out), "--format", "json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["rows"]
    assert [(r["name"], r["state"], r["job"]) for r in rows] == [
        ("v2-b256_contr-t0.2", "finished", signalled), ("v2-b256_align3-unif3", "finished", other)]
    assert all(r["top1"] is not None for r in rows)
    table = run_mauctl("status", str(out), cwd=tmp_path, COLUMNS="80")
    print(table.stdout)
    assert table.returncode == 0 and max(map(len, table.stdout.splitlines())) <= 80

    report = run_mauctl("report", str(out), "--format", "json", cwd=tmp_path)
    shown = json.loads(report.stdout)["other_runs"]  # a 3-class folder: no table row, listed apart
    assert sorted(Path(e["run"]).name for e in shown) == ["v2-b256_align3-unif3", "v2-b256_contr-t0.2"]

    # the same sweep again: nothing to submit, nothing submitted
    again = run_mauctl(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 finished, 0 queued or running, 0 to submit" in again.stdout
    assert not slurm_cluster.squeue()
    assert [len(c.jobs) for c in read_plan(out).cells.values()] == [1, 1]


def test_a_queued_cell_is_not_submitted_twice_and_a_failing_one_is_not_requeued(
        tmp_path, tiny_images, slurm_cluster):
    out = tmp_path / "runs"
    # an LR of 1e30: the loss is not finite at the first step, and the run fails (a bug-like failure)
    args = ["sweep", str(tiny_images), "--presets", "v2-b256", "--losses", "contr-t0.2", *SLURM_CELL,
            "--set", "optim.lr=1e30", "--out", str(out)]
    first = run_mauctl(*args, "--sbatch", "begin=now+600", cwd=tmp_path)  # held in the queue for now
    assert first.returncode == 0, first.stdout + first.stderr
    job = read_plan(out).cells["v2-b256_contr-t0.2"].last_job["id"]
    assert slurm_cluster.squeue(job) == {job: "PENDING"}

    queued = run_mauctl(*args, cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr
    assert "0 finished, 1 queued or running, 0 to submit" in queued.stdout
    assert list(slurm_cluster.squeue()) == [job]

    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    slurm_cluster.wait_for(lambda: job not in slurm_cluster.squeue(), 300, f"job {job} to end")
    time.sleep(2)  # would a requeue show up?
    assert job not in slurm_cluster.squeue()
    assert slurm_cluster.job_field(job, "JobState") == "FAILED"
    assert slurm_cluster.job_field(job, "Restarts") == "0"
    status = json.loads(run_mauctl("status", str(out), "--format", "json", cwd=tmp_path).stdout)
    assert status["rows"][0]["state"] == "failed"
    assert "non-finite" in job_log(out, job)
