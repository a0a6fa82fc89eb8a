"""Everything decided and checked before a worker starts: config, world, data, run directory.

`mauctl pretrain --dry-run` prints what `prepare_pretrain` found; a real run hands the same
`Job` to the launcher, so a dry run and a run can never disagree.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mauctl import __version__
from mauctl.backbone import check_encoder
from mauctl.config import DataConfig, LinclsConfig, PretrainConfig, Resolved, load_config, loss_name, read_toml, to_toml
from mauctl.data.folder import FolderIndex, data_root, scan_split
from mauctl.engine.rundir import RunDir, check_before_launch, check_writable, config_differences
from mauctl.engine.schedule import describe_schedule
from mauctl.errors import UsageError
from mauctl.launch import Plan, bn_splits, in_worker, make_plan
from mauctl.weights import Encoder, read_encoder


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

    def spec(self) -> dict[str, Any]:
        """What the workers get: the command, the resolved config, what the run directory records."""
        return {"command": "pretrain", "config": self.config.model_dump(),
                "meta": {"preset": self.preset, "loss": self.loss, "argv": sys.argv}}


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
    if train is not None:
        _check_one_batch(train, config.optim.batch_size, "Lower --batch-size (and model.queue_size, a multiple of it)")
    job = Job(resolved, plan, splits, train, preset, loss_name(config.loss))
    if owns_run_dir(config, environ):
        job.run_action = _check_run_dir(config, overwrite)
    elif overwrite:
        raise UsageError("--overwrite is only honoured on node 0 (launch.node_rank = 0)")
    return job


def owns_run_dir(config: PretrainConfig | LinclsConfig, environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    if in_worker(environ):
        return int(environ["RANK"]) == 0
    return config.launch.node_rank == 0


def _check_run_dir(config: PretrainConfig | LinclsConfig, overwrite: bool) -> str:
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


def _check_one_batch(index: FolderIndex, batch_size: int, fix: str) -> None:
    if len(index.samples) < batch_size:
        raise UsageError(
            f"{index.root} has {len(index.samples)} images, fewer than one global batch "
            f"(optim.batch_size = {batch_size})",
            hint=f"{fix} or add images.",
        )


# ---------------------------------------------------------------- the linear probe


@dataclass
class LinclsJob:
    resolved: Resolved
    plan: Plan
    encoder: Encoder
    data_root: Path
    train: FolderIndex
    val: FolderIndex
    name: str
    evaluate: bool
    run_action: str = "new"

    @property
    def config(self) -> LinclsConfig:
        return self.resolved.config  # type: ignore[return-value]

    def spec(self) -> dict[str, Any]:
        return {"command": "lincls", "config": self.config.model_dump(),
                "meta": {"source": str(self.encoder.path), "data_root": str(self.data_root), "name": self.name,
                         "evaluate": self.evaluate}}


def prepare_lincls(
    source: Path,
    *,
    preset: str | None,
    config_file: Path | None,
    flags: Mapping[str, Any],
    sets: Sequence[str],
    name: str | None = None,
    evaluate: bool = False,
    environ: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> LinclsJob:
    """Resolve the probe's config, the encoder, the data (by default the pretraining run's) and the output.

    ``data.image_size`` not given anywhere is the pretraining run's; the output directory defaults
    to ``<run>/lincls/<name>`` (``runs/<checkpoint>-lincls/<name>`` for a checkpoint from elsewhere).
    """
    enc = read_encoder(source)
    if preset is None and config_file is None:
        preset = "lincls"
    resolved = load_config("lincls", preset=preset, config_file=config_file, flags=flags, sets=sets,
                           environ=environ)
    config: LinclsConfig = resolved.config  # type: ignore[assignment]
    pretrain_data = DataConfig.model_validate(enc.config["data"]) if enc.config else None
    if "data.image_size" not in resolved.origin and pretrain_data is not None:
        config.data.image_size = pretrain_data.image_size
        resolved.origin["data.image_size"] = "the pretraining run"
    if config.data.root or config.data.builtin:
        root = data_root(config.data)
    elif pretrain_data is not None and (pretrain_data.root or pretrain_data.builtin):
        root = data_root(pretrain_data)
        config.data.root = str(root)
        resolved.origin["data.root"] = "the pretraining run"
    else:
        raise UsageError(f"no data for the probe: {source} does not say which dataset it was trained on",
                         hint="Give DATA, a folder with train/ and val/ (one subfolder per class).")
    train, val = scan_split(root, "train"), scan_split(root, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UsageError(
            f"{root}: train/ and val/ have different classes (only in train: {', '.join(only_train[:10]) or '-'}; "
            f"only in val: {', '.join(only_val[:10]) or '-'})",
            hint="A linear probe needs the same class folders in both splits.",
        )
    name = name or preset or (config_file.stem if config_file else "lincls")
    if not re.fullmatch(r"[\w.\-]+", name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    if not config.run.out:
        config.run.out = str(_default_lincls_out(enc, name))
        resolved.origin["run.out"] = "derived from the checkpoint and --name"
    if evaluate and enc.source != "mauctl-lincls":
        trained = Path(config.run.out) / "best.pt"
        if not trained.is_file():
            raise UsageError(f"--evaluate: no trained classifier at {trained}",
                             hint="Train the probe first (the same command without --evaluate).")
        enc = read_encoder(trained)
    plan = make_plan(config.run, config.launch, config.optim, environ)
    if not evaluate:
        _check_one_batch(train, config.optim.batch_size, "Lower --batch-size")
    job = LinclsJob(resolved, plan, enc, root, train, val, name, evaluate)
    if not evaluate and owns_run_dir(config, environ):
        job.run_action = _check_run_dir(config, overwrite)
    return job


def lincls_dry_run_text(job: LinclsJob) -> str:
    """The probe's resolved config as TOML, headed by what it would read and write."""
    header = "\n".join([
        f"mauctl {__version__} lincls --dry-run: nothing was trained or written.",
        f"encoder: {job.encoder.arch} from {job.encoder.path} ({job.encoder.source})",
        f"data: {job.data_root}: {len(job.train.classes)} classes, {len(job.train.samples)} train / "
        f"{len(job.val.samples)} val images",
        f"world size: {job.plan.world_size} on {job.plan.device_type}",
        f"output: {job.config.run.out}",
    ])
    return to_toml(job.config, header)


def _default_lincls_out(enc: Encoder, name: str) -> Path:
    if enc.source == "mauctl-lincls":  # a probe's own checkpoint: its folder
        folder = enc.path.resolve().parent
        return folder.parent if folder.name == "checkpoints" else folder
    base = enc.run_dir or Path("runs") / f"{enc.path.stem}-lincls"
    return base / "lincls" / name
