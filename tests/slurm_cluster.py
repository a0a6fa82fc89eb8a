"""A private one-node SLURM (slurmctld + slurmd from Debian's slurm-wlm, with munge) for the tests.

`slurm_cluster` (tests/conftest.py) starts one per test session in a temporary folder: its own
slurm.conf (through SLURM_CONF, set in os.environ for the session so that submitit's sbatch,
squeue and scontrol calls see it), its own ports, state, spool and logs, so it never meets a
system SLURM. It is skipped, never installed, where the packages are missing or we are not root;
.ci/run installs them.

What this SLURM does with submitit's jobs (slurm-wlm 22.05, submitit 1.5.4, 2 cores; checked by
tests/test_slurm_cluster.py, times measured by hand):

- submitit runs the callable under `srun`, as a job step. `scancel -s USR2 JOB` signals every
  process of the step, not the batch shell: the submitit process, its child, and the child's
  child even in a new session (as torchrun starts workers). proctrack/linuxproc finds them by
  descent (proctrack/cgroup on a cluster, by cgroup). `-s USR1` reaches the same processes; so does
  submitit's `--signal=USR2@N` at a time limit (it came 46 s into a 2-minute job with N=60: SLURM
  may send it up to a minute early). A process with no handler dies of it (the default action);
  mauctl's workers (engine/runtime.py) and its torchrun handle USR1, not USR2. For an array,
  `JOB_TASK` signals that task only, `JOB` every task.
- submitit installs its USR2 handler (task 0 acts, other tasks ignore it) before it calls the
  callable; one the callable installs replaces it. With a `checkpoint` method it calls it, runs
  `scontrol requeue` and exits. Without one it requeues the job too (a "preemption") when it has
  run less than min(80% of timeout_min, timeout_min - 10 min), and otherwise fails it (a
  "time-out": always so under a 10-minute timeout_min; tried with 5 and 60). By submitit's source,
  each time-out uses one of `max_num_timeout` (3) requeues, and the next one fails the job. A
  callable that raises is not requeued (FAILED, Restarts=0).
- Times: submit to RUNNING under 1 s, to the callable running 0.7 to 1.5 s; signal to PENDING
  (Reason=BeginTime) 0.2 s. A requeued job is eligible 120 s after the requeue (its BeginTime),
  then waits for a scheduler pass: it ran again 138 s after the signal. With `release()`, 3 s
  after. A start within the second of the requeue fails ("Job credential revoked": FAILED, never
  requeued again; 1 of 5 tries), so `release()` waits for the next second. The job keeps its job
  id, array job id and task id, SLURM_RESTART_COUNT becomes 1, and `job.result()` returns what the
  second run returned.
- squeue (`-h -r -o "%i|%T" -j ARRAY`) shows each task: `4242_0|PENDING` (or `4242_[2-3%4]` without
  -r), RUNNING, COMPLETING for a moment, and PENDING again after a requeue (never REQUEUED). An
  ended job is not listed, even by id, unless `-t all` is given; then it shows COMPLETED, FAILED or
  CANCELLED for MinJobAge (300 s, gone after about 330 s). Once purged, `squeue -j ID` fails with
  "Invalid job id specified" (exit 1), unless another id asked for is still known.
- Without accounting (sacct is disabled) submitit's `job.state` is "UNKNOWN" throughout.
  `job.done()` and `job.result()` work from the result file; a job that ends without one
  (cancelled, killed) leaves `job.result()` waiting forever, so `SlurmCluster.result` asks squeue.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mauctl.slurm import is_active

T = TypeVar("T")

DAEMONS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun", "slurmctld", "slurmd", "munged", "munge",
           "unmunge")
MISSING = "slurm-wlm and munge are not installed: .ci/run installs them as root with apt-get"
START_TIMEOUT_S = 60


def missing_reason() -> str | None:
    """Why a private SLURM cannot be started here, or None when it can."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [name for name in DAEMONS if shutil.which(name, path=path) is None]
    if missing:
        return f"{MISSING} (missing: {', '.join(missing)})"
    if os.geteuid() != 0:
        return "a private slurmctld/slurmd must run as root (SlurmUser=root): run the SLURM tests as root"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text[-lines:])


def munge_works() -> bool:
    try:
        cred = subprocess.run([_which("munge"), "-n"], check=False, capture_output=True, timeout=10)
        check = subprocess.run([_which("unmunge")], check=False, input=cred.stdout, capture_output=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return cred.returncode == 0 and check.returncode == 0


def start_munged() -> subprocess.Popen | None:
    """A munged in the foreground (so its pid is ours to stop), or None when a running one answers."""
    if munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    # --force: a socket left by a munged that died would otherwise stop it from starting
    proc = subprocess.Popen([_which("munged"), "--foreground", "--force"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 20
    while not munge_works():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            raise RuntimeError(f"munged did not start (exit status {proc.returncode}):\n{err}")
        time.sleep(0.2)
    return proc


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


SLURM_CONF = """\
ClusterName=mauctltest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ReturnToService=2
JobRequeue=1
MpiDefault=none
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """A private slurmctld + slurmd under ``root``; ``start()``, then ``stop()`` (also on failure)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env: dict[str, str] = {}  # os.environ with SLURM_CONF, for subprocesses
        self._procs: list[subprocess.Popen] = []
        self._munged: subprocess.Popen | None = None
        self._old_conf: str | None = None

    # -- life --------------------------------------------------------------------------------------

    def start(self) -> SlurmCluster:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # slurmd checks the node's memory against RealMemory and drains a node that has less
        memory = max(256, int(_mem_total_mb() * 0.9))
        self.conf.write_text(SLURM_CONF.format(node=self.node, root=self.root, ctld_port=_free_port(),
                                               slurmd_port=_free_port(), cpus=os.cpu_count() or 1, memory=memory))
        self._munged = start_munged()
        self._old_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        self.env = dict(os.environ)
        # -D: in the foreground, so the pids are those of the daemons themselves
        for argv in ([_which("slurmctld"), "-D", "-f", str(self.conf)],
                     [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node]):
            self._procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                start_new_session=True, env=self.env))
        try:
            self.wait_for(self._node_idle, START_TIMEOUT_S, "the node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        dead = [p.args[0] for p in self._procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited at start:\n{self.log_tail()}")
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return "idle" in out

    def stop(self) -> None:
        """scontrol shutdown, then each daemon we started killed by pid if still alive; munged only if ours."""
        if self._procs:
            self._end_jobs()
            self.run("scontrol", "shutdown", check=False, timeout=20)
            for proc in self._procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._procs = []
        if self._munged is not None:
            self._munged.send_signal(signal.SIGTERM)
            try:
                self._munged.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._munged.kill()
                self._munged.wait()
            self._munged = None
        if self._old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._old_conf

    def _end_jobs(self) -> None:
        """Cancel what a failed test left queued or running: slurmstepd and the job's processes outlive
        slurmd. submitit's tasks ignore the SIGTERM, so this takes KillWait (30 s) until the SIGKILL
        (`scancel -s KILL` is a cancel too)."""
        jobs = list(self.squeue())
        if not jobs:
            return
        self.run("scancel", *jobs, check=False)
        try:
            self.wait_for(lambda: not self.squeue(), 45, "the jobs left running to end")
        except AssertionError as exc:
            print(f"slurm_cluster: {exc}")

    # -- helpers for tests ------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, squeue, scontrol, scancel, sinfo) against this cluster."""
        done = subprocess.run([_which(argv[0]), *argv[1:]], check=False, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}\n"
                               f"{self.log_tail()}")
        return done

    def squeue(self, job_id: str | None = None, ended: bool = False) -> dict[str, str]:
        """squeue's state of each job (array tasks one by one: "4242_1"), of all or of one job or array.

        squeue lists only queued and running jobs, even when asked for one by id; ``ended``: also those
        that ended less than MinJobAge (300 s) ago (COMPLETED, FAILED, CANCELLED...).
        """
        states = ["-t", "all"] if ended else []
        out = self.run("squeue", "-h", "-r", "-o", "%i|%T", *states, *(["-j", job_id] if job_id else []),
                       check=False).stdout
        return dict(line.split("|", 1) for line in out.split() if "|" in line)

    def job_field(self, job_id: str, name: str) -> str | None:
        """One field of ``scontrol show job`` (JobState, Reason, Restarts, ExitCode...)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv).get(name)

    def result(self, job, timeout: float = 60):
        """A submitit job's result, or its error; an AssertionError with the logs if it does not end in time.

        Without accounting (no sacct) submitit cannot see a job that ended without writing its result
        (cancelled, killed, lost): ``job.result()`` would wait forever, so squeue is asked too.
        """
        def ended():
            state = self.squeue(job.job_id, ended=True).get(job.job_id)
            return job.paths.result_pickle.exists() or (state is not None and not is_active(state))
        try:
            self.wait_for(ended, timeout, f"job {job.job_id} to end")
        except AssertionError as exc:
            log = job.stderr() or ""
            raise AssertionError(f"{exc}\n--- the job's stderr\n{log[-3000:]}") from None
        return job.result()

    def signal(self, job_id: str, name: str) -> None:
        """``scancel -s NAME JOB``: to every process of the job's steps, not to the batch shell."""
        self.run("scancel", "-s", name, job_id)

    def release(self, job_id: str, timeout: float = 60) -> None:
        """Make a requeued job eligible now, instead of after its two-minute BeginTime.

        Waits until squeue shows it PENDING, then until the clock is in a later second: slurmd refuses
        a launch whose credential was made in the second the requeue revoked the old one ("Job
        credential revoked"), and the job then ends FAILED and is not requeued again; SLURM's own
        delay exists to avoid this.
        """
        seen = self.wait_for(lambda: self.squeue(job_id).get(job_id) == "PENDING" and time.time(), timeout,
                             f"job {job_id} to be pending again")
        time.sleep(max(0.0, math.floor(seen) + 1.5 - time.time()))
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(f"--- {name} (last {lines} lines)\n{_tail(self.root / name, lines)}"
                         for name in ("slurmctld.log", "slurmd.log"))

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str = "the condition",
                 every: float = 0.2) -> T:
        """``predicate()``'s first true value, polled; after ``timeout`` s an AssertionError with the logs."""
        deadline = time.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"waited {timeout:.0f} s for {what}; squeue: {self.squeue()}\n"
                                     f"{self.log_tail()}")
            time.sleep(every)
