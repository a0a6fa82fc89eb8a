"""How many processes, on which device: decided once, before any worker starts."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mauctl.config import LaunchConfig, OptimConfig, RunConfig
from mauctl.errors import EXIT_STOPPED, RunError, UsageError
from mauctl.text import plural


@dataclass(frozen=True)
class Plan:
    world_size: int
    nproc_per_node: int
    nnodes: int
    device_type: str  # "cpu" or "cuda"
    inside_worker: bool  # already started by torchrun / srun

    def per_process_batch(self, optim: OptimConfig) -> int:
        return optim.batch_size // self.world_size


def in_worker(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return "RANK" in environ and "WORLD_SIZE" in environ


def device_type(run: RunConfig) -> str:
    if run.device != "auto":
        return run.device.split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_plan(run: RunConfig, launch: LaunchConfig, optim: OptimConfig,
              environ: Mapping[str, str] | None = None) -> Plan:
    """World size from torchrun's variables when inside a worker, else from the launch config."""
    environ = os.environ if environ is None else environ
    kind = device_type(run)
    one_gpu = kind == "cuda" and ":" in run.device  # cuda:N, the same GPU for every process of a node
    if in_worker(environ):
        world = int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_WORLD_SIZE", world))
        if one_gpu and "LOCAL_WORLD_SIZE" in environ:  # (srun does not say how many processes share a node)
            _check_one_process_per_gpu(run.device, local)
        plan = Plan(world, local, max(1, world // local), kind, True)
    else:
        nproc = launch.nproc_per_node
        if one_gpu and nproc != "auto":
            _check_one_process_per_gpu(run.device, nproc)
        if kind == "cuda" and (_visible_gpus() == 0 or int(run.device.partition(":")[2] or 0) >= _visible_gpus()):
            raise UsageError(f"run.device = {run.device!r}, but {plural(_visible_gpus(), 'CUDA GPU')} visible here",
                             hint="Use --device cpu (or auto), or check CUDA_VISIBLE_DEVICES.")
        if nproc == "auto":
            nproc = _visible_gpus() if kind == "cuda" and not one_gpu else 1
        if kind == "cuda" and nproc > max(1, _visible_gpus()):
            raise UsageError(
                f"launch.nproc_per_node = {nproc} but only {plural(_visible_gpus(), 'GPU')} visible",
                hint="Lower --nproc-per-node or check CUDA_VISIBLE_DEVICES.",
            )
        plan = Plan(nproc * launch.nnodes, nproc, launch.nnodes, kind, False)
    if optim.batch_size % plan.world_size:
        raise UsageError(
            f"optim.batch_size = {optim.batch_size} is not divisible by the world size {plan.world_size} "
            f"({plural(plan.nnodes, 'node')} x {plural(plan.nproc_per_node, 'process', 'processes')})",
            hint="The batch size is global: choose one that splits evenly over the processes.",
        )
    return plan


def _check_one_process_per_gpu(device: str, processes: int) -> None:
    """NCCL cannot run two processes of one job on one GPU: a named GPU is for one process per node."""
    if processes > 1:
        raise UsageError(
            f"run.device = {device!r} would put all {processes} processes of a node on one GPU",
            hint="Use --device cuda (each process takes the GPU of its local rank) and choose the GPUs with "
                 "CUDA_VISIBLE_DEVICES, or run one process per node with --nproc-per-node 1.",
        )


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


# ---------------------------------------------------------------- starting the workers through torchrun

JOB_ENV = "MAUCTL_JOB"
STOP_SIGNAL_NAMES = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
STOP_GRACE_S = 90  # SLURM's --signal=USR1@120 leaves two minutes


def torchrun_argv(plan: Plan, launch: LaunchConfig, rdzv_id: str) -> list[str]:
    """torchrun's command line for this plan; the worker is ``python -m mauctl.worker``."""
    argv = [f"--nproc-per-node={plan.nproc_per_node}", f"--max-restarts={launch.max_restarts}",
            "--monitor-interval=0.5"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}"]
    if _torchrun_accepts(f"--signals-to-handle={STOP_SIGNAL_NAMES}"):  # newer torchrun: forward SIGUSR1/2 as they are
        argv.append(f"--signals-to-handle={STOP_SIGNAL_NAMES}")
    return argv + ["--module", "mauctl.worker"]


def _torchrun_accepts(flag: str) -> bool:
    from torch.distributed.run import get_args_parser

    return not get_args_parser().parse_known_args([flag, "--module", "mauctl.worker"])[1]


def rdzv_id(out: str) -> str:
    """The same id on every node of one job: SLURM's job id, or one derived from the run directory."""
    import hashlib

    if os.environ.get("SLURM_JOB_ID"):
        return f"mauctl-{os.environ['SLURM_JOB_ID']}"
    return "mauctl-" + hashlib.sha256(str(out).encode()).hexdigest()[:12]


def start_workers(job: dict, plan: Plan, launch: LaunchConfig) -> None:
    """Run torchrun in this process until the workers end. Raises RunError if they failed."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from mauctl.engine.rundir import RunDir

    os.environ[JOB_ENV] = json.dumps(job)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node)))
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", STOP_SIGNAL_NAMES)
    # After the launcher is told to stop, the workers get this long to finish their step and save
    # before torchrun kills them (its default, 30 s, is short for a large checkpoint).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_GRACE_S))
    # With the rendezvous store shared (torch >= 2.5's default), workers restarted by --max-restarts
    # can read the previous round's addresses and fail to connect; a store per round cannot.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Older torch handles no SIGUSR1/2 in the agent: turn them into the SIGTERM it does handle.
    for stop in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(stop, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    quiet_torchrun()
    try:
        run(parse_args(torchrun_argv(plan, launch, rdzv_id(job["config"]["run"]["out"]))))
    except SignalException as exc:
        raise WorkersStopped(exc.sigval.name) from None
    except ChildFailedError as exc:
        failures = ", ".join(
            f"rank {rank} exit code {f.exitcode}" + (f" ({f.signal_name()})" if f.exitcode < 0 else "")
            for rank, f in sorted(exc.failures.items())
        )
        if launch.node_rank == 0:
            RunDir(Path(job["config"]["run"]["out"])).mark_failed(f"worker process(es) failed: {failures}")
        raise RunError(f"worker process(es) failed: {failures}; their messages are above",
                       hint="Run the same command to resume from the last checkpoint "
                       "(--max-restarts N lets torchrun do that by itself).") from None


def quiet_torchrun() -> None:
    """Silence torchrun's own log lines ("Received 2 death signal, shutting down workers", failure
    dumps): mauctl says what happened. Each elastic module sets its logger's level when imported."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class WorkersStopped(Exception):
    """The launcher itself got a stop signal; the workers were asked to save and stop."""


def launch(job: dict, plan: Plan, config: LaunchConfig) -> int:
    """Run a prepared job on workers that torchrun starts here; the exit status from the run's status.

    0 finished, EXIT_STOPPED stopped by a signal (checkpoint saved); RunError when it failed.
    """
    from mauctl.engine.rundir import RunDir

    try:
        start_workers({**job, "launched_by_mauctl": True, "launcher_pid": os.getpid()}, plan, config)
    except WorkersStopped as exc:
        print(f"{exc.args[0]} received: the workers saved a checkpoint and stopped")
    status = RunDir(Path(job["config"]["run"]["out"])).read_status()
    if status.get("state") == "finished":
        return 0
    if status.get("state") == "stopped":
        return EXIT_STOPPED
    raise RunError(f"the run stopped without finishing (status: {status.get('state', 'unknown')})",
                   hint="Run the same command to resume from the last checkpoint.")
