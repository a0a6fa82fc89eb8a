"""What SLURM says about a sweep's jobs (squeue), for `mauctl sweep` and `mauctl status`.

squeue lists the jobs that are queued or running (and, for a few minutes, those just ended); it
needs no accounting database, which sacct does and many small clusters lack. A job it does not
list has ended: the run directory then says how.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

# squeue's states of a job that still holds, or will hold, its cell: not to be submitted again
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING", "RESV_DEL_HOLD",
          "STOPPED", "SPECIAL_EXIT"}
RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}


class SlurmUnavailable(Exception):
    """squeue is missing or failed: whether a job is queued cannot be known."""


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """squeue's state of each job id ("4242" or an array task "4242_3") that it lists; others are left out.

    Raises SlurmUnavailable when squeue cannot be run or fails.
    """
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    squeue = shutil.which("squeue")
    if squeue is None:
        raise SlurmUnavailable("squeue is not on the PATH")
    parents = sorted({i.split("_")[0] for i in ids})
    try:
        done = subprocess.run([squeue, "-h", "-r", "-o", "%i|%T", "-j", ",".join(parents)],
                              check=False, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmUnavailable(f"squeue failed: {exc}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        if message and "Invalid job id" in message[-1]:  # every job asked for has ended and been purged
            return {}
        raise SlurmUnavailable(f"squeue failed: {message[-1] if message else f'exit status {done.returncode}'}")
    states = {}
    for line in done.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job in ids or job.split("_")[0] in ids:
            states[job] = state
    return {i: states[i] for i in ids if i in states}


def is_active(state: str | None) -> bool:
    """The job is queued or running (a new submission would run the same cell twice)."""
    return state is not None and (state in QUEUED or state in RUNNING)


def describe(state: str) -> str:
    """queued or running, as `mauctl status` shows a job's state."""
    return "running" if state in RUNNING else "queued"
