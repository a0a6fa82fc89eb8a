"""What torchrun starts: ``python -m mauctl.worker``, one process per rank.

The launcher passes the job (command, resolved config, metadata) as JSON in $MAUCTL_JOB.
When the user starts ``mauctl pretrain`` under their own torchrun or srun, the CLI calls
``run_job`` directly in each process instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

from mauctl.errors import EXIT_STOPPED, MauctlError


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
        rank = int(os.environ.get("RANK", 0))
        prefix = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        console = Console(stderr=True, soft_wrap=True)
        console.print(f"[bold red]error:[/] {escape(prefix + exc.message)}", highlight=False)
        if exc.hint:
            console.print(exc.hint, markup=False, highlight=False)
        return exc.exit_code
    finally:
        if rt is not None:
            rt.close()
    if outcome == "stopped" and not job.get("launched_by_mauctl"):
        return EXIT_STOPPED
    return 0  # under mauctl's launcher a stop exits 0, so torchrun does not restart; the launcher reports it


def fast_exit(code: int) -> None:
    """Exit without the interpreter's teardown of torch (about a second): every file is closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    job = json.loads(os.environ["MAUCTL_JOB"])
    fast_exit(run_job(job))


if __name__ == "__main__":
    main()
