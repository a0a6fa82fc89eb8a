"""Everything decided and checked before a worker starts: config, world, data, run directory.

`mauctl pretrain --dry-run` prints what `prepare_pretrain` found; a real run hands the same
`Job` to the launcher, so a dry run and a run can never disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mauctl import __version__
from mauctl.backbone import check_encoder
from mauctl.config import PretrainConfig, Resolved, load_config, loss_name, read_toml, to_toml
from mauctl.data.folder import FolderIndex, data_root, scan_split
from mauctl.engine.rundir import RunDir, check_before_launch, check_writable, config_differences
from mauctl.engine.schedule import describe_schedule
from mauctl.errors import UsageError
from mauctl.launch import Plan, bn_splits, in_worker, make_plan


@dataclass
class Job:
    resolved: Resolved
    plan: Plan
    bn_splits: int
    train: FolderIndex | None  # None when no data was given to a dry run
    preset: str | None
    loss: str | None
    run_action: str = "new"  # new, resume or replace (see engine.rundir.check_before_launch)

    @property
    def config(self) -> PretrainConfig:
        return self.resolved.config  # type: ignore[return-value]


def prepare_pretrain(
    *,
    preset: str | None,
    config_file: Path | None,
    loss: str | None,
    flags: Mapping[str, Any],
    sets: Sequence[str],
    environ: Mapping[str, str] | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
) -> Job:
    """Resolve and check. A dry run may leave the data out; a real run may not.

    Only the process that owns the run directory (node 0's launcher, or rank 0 under an outside
    torchrun) checks it; the workers agree on the checkpoint once their process group is up.
    """
    resolved = load_config("pretrain", preset=preset, config_file=config_file, loss=loss, flags=flags, sets=sets,
                           environ=environ)
    config: PretrainConfig = resolved.config  # type: ignore[assignment]
    plan = make_plan(config.run, config.launch, config.optim, environ)
    splits = bn_splits(config.model.bn_splits, plan.per_process_batch(config.optim))
    check_encoder(config.model.arch, config.model.dim, config.model.mlp, config.model.small_stem,
                  config.data.image_size)
    train = None
    if config.data.root or (config.data.builtin and not dry_run):
        train = scan_split(data_root(config.data), "train")
    elif not config.data.builtin and not dry_run:
        raise UsageError("no training data: give a DATA folder (or data.root), or use --preset demo")
    if train is not None and len(train.samples) < config.optim.batch_size:
        raise UsageError(
            f"{train.root} has {len(train.samples)} images, fewer than one global batch "
            f"(optim.batch_size = {config.optim.batch_size})",
            hint="Lower --batch-size (and model.queue_size, a multiple of it) or add images.",
        )
    job = Job(resolved, plan, splits, train, preset, loss_name(config.loss))
    if owns_run_dir(config, environ):
        job.run_action = _check_run_dir(config, overwrite)
    elif overwrite:
        raise UsageError("--overwrite is only honoured on node 0 (launch.node_rank = 0)")
    return job


def owns_run_dir(config: PretrainConfig, environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    if in_worker(environ):
        return int(environ["RANK"]) == 0
    return config.launch.node_rank == 0


def _check_run_dir(config: PretrainConfig, overwrite: bool) -> str:
    run = RunDir(Path(config.run.out))
    differences = []
    if run.config.is_file():
        previous = read_toml(run.config)
        differences = config_differences(previous, config.model_dump())
    action = check_before_launch(run, config.run.resume, overwrite, differences)
    check_writable(run.path)
    return action


def dry_run_text(job: Job) -> str:
    """The resolved config as TOML, headed by the plan as comments: save it and pass it back with --config."""
    c = job.config
    per_process = job.plan.per_process_batch(c.optim)
    lines = [
        f"mauctl {__version__} pretrain --dry-run: nothing was trained or written.",
        f"preset: {job.preset or '-'}; loss column: {job.loss or 'custom (matches no published column)'}",
        f"world size: {job.plan.world_size} = {job.plan.nnodes} node(s) x {job.plan.nproc_per_node} process(es) "
        f"on {job.plan.device_type}" + (" (inside an existing torchrun/SLURM worker)" if job.plan.inside_worker else ""),
        f"batch: global {c.optim.batch_size}, per process {per_process}, "
        f"{job.bn_splits} BatchNorm group(s) of {per_process // job.bn_splits} per process",
        f"LR schedule: {describe_schedule(c.optim)}",
    ]
    if job.train is not None:
        steps = len(job.train.samples) // c.optim.batch_size
        lines.append(
            f"data: {job.train.root}: {len(job.train.classes)} classes, {len(job.train.samples)} images, "
            f"{steps} steps per epoch ({steps * c.optim.epochs} in all)"
        )
    elif c.data.builtin:
        lines.append(f"data: built-in '{c.data.builtin}' (materialised in the cache on the first run)")
    else:
        lines.append("data: not given (pass DATA to count classes, images and steps per epoch)")
    action = {"new": "a new run", "resume": "would resume from its last checkpoint",
              "replace": "would start over, moving the old run aside"}[job.run_action]
    lines.append(f"run directory: {c.run.out} ({action})")
    return to_toml(c, "\n".join(lines))
