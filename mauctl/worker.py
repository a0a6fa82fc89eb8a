"""A job's processes: where a prepared job runs, and what torchrun starts (``python -m mauctl.worker``).

``start`` runs a job that prepare.py resolved and checked: in this very process when it already
is a worker of the user's own torchrun or srun (RANK and WORLD_SIZE set), else on the workers
that mauctl's launcher (launch.py) starts, which pass the job (command, resolved config,
metadata) as JSON in $MAUCTL_JOB to ``main``; either way ``run_job`` runs it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from mauctl.engine.rundir import RunDir
from mauctl.errors import EXIT_STOPPED, MauctlError
from mauctl.text import plural


def start(job: Any) -> int:
    """Run a prepared job (prepare.Job or LinclsJob) to its end; the exit status (0, EXIT_STOPPED, 1)."""
    from mauctl.engine.rundir import move_aside
    from mauctl.launch import launch

    spec, plan = job.spec(), job.plan
    run = RunDir(Path(spec["config"]["run"]["out"]))
    if job.run_action == "replace":
        print(f"moved the previous run in {run.path} to {move_aside(run.path)}")
    status, epochs = run.read_status(), spec["config"]["optim"]["epochs"]
    if (job.run_action == "resume" and plan.nnodes == 1 and not plan.inside_worker
            and status.get("state") == "finished" and status.get("epoch", 0) >= epochs):
        print(f"{run.path} has already finished its {plural(epochs, 'epoch')}; nothing to do "
              "(--epochs N trains longer)")
        return 0
    if plan.inside_worker:
        return run_job(spec)
    return launch(spec, plan, job.config.launch)


def run_job(job: dict[str, Any]) -> int:
    """Run one job in this process; return the process exit status."""
    from mauctl.config import LinclsConfig, PretrainConfig
    from mauctl.engine import runtime

    if job["command"] == "pretrain":
        from mauctl.pretrain import run
    elif job["command"] == "lincls":
        from mauctl.lincls import run
    else:
        raise ValueError(f"unknown job {job['command']!r}")
    schema = PretrainConfig if job["command"] == "pretrain" else LinclsConfig
    config = schema.model_validate(job["config"])
    rt = None
    try:
        rt = runtime.start(config.run.device, config.run.precision)
        outcome = run(config, rt, job.get("meta", {}))
    except MauctlError as exc:
        if rt is not None and rt.is_main:
            RunDir(Path(config.run.out)).mark_failed(exc.message)
        _print_error(exc.message, exc.hint)
        return exc.exit_code
    except Exception as exc:
        if rt is None or not rt.distributed or not _peer_lost(exc):
            raise  # a bug: the traceback is the report
        _print_error(f"lost contact with the other workers ({_first_sentence(exc)})",
                     "Another worker failed or was killed: its message, or the launcher's, says why.")
        return 1
    finally:
        if rt is not None:
            rt.close()
    if outcome == "stopped" and not job.get("launched_by_mauctl"):
        return EXIT_STOPPED
    return 0  # under mauctl's launcher a stop exits 0, so torchrun does not restart; the launcher reports it


def _print_error(message: str, hint: str | None) -> None:
    rank = int(os.environ.get("RANK", 0))
    prefix = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    console = Console(stderr=True, soft_wrap=True)
    console.print(f"[bold red]error:[/] {escape(prefix + message)}", highlight=False)
    if hint:
        console.print(hint, markup=False, highlight=False)


def _peer_lost(exc: Exception) -> bool:
    """Whether a collective failed because another rank is gone (gloo and NCCL say so in RuntimeErrors)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection reset",
                                                                    "Connection closed"))
    )


def _first_sentence(exc: Exception) -> str:
    """``Read error [host]:port: Connection reset by peer`` out of gloo's ``[file.cc:545] Read error ... GLHF!``."""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h)[^\]]*\]\s*", "", str(exc).strip())
    return text.splitlines()[0].split(". ")[0][:200] if text else type(exc).__name__


def fast_exit(code: int) -> None:
    """Exit without the interpreter's teardown of torch (about a second): every file is closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def die_with_launcher(launcher_pid: int | None) -> None:
    """If mauctl's launcher dies, even by SIGKILL, this worker dies too (Linux; elsewhere a no-op).

    torchrun starts every worker in a session of its own, so killing the launcher's process group
    would otherwise leave the workers training on, writing into the run directory, unwatched.
    """
    if launcher_pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != launcher_pid:  # the launcher was gone before the line above took effect
        fast_exit(1)


def main() -> None:
    job = json.loads(os.environ["MAUCTL_JOB"])
    die_with_launcher(job.get("launcher_pid"))
    fast_exit(run_job(job))


if __name__ == "__main__":
    main()
