"""Everything decided and checked before a worker starts: config, world, data, run directory.

`mauctl pretrain --dry-run` prints what `prepare_pretrain` found; a real run hands the same
`Job` to the launcher, so a dry run and a run can never disagree.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mauctl import __version__, files
from mauctl.backbone import build_encoder, check_encoder
from mauctl.config import (DataConfig, LaunchConfig, LinclsConfig, PretrainConfig, Resolved, load_config,
                           loss_name, read_toml, saved_config, to_toml)
from mauctl.data.folder import FolderIndex, check_splits, data_root, scan_split, scan_split_if_present
from mauctl.engine.checkpoint import LINCLS_FORMAT, PRETRAIN_FORMAT
from mauctl.engine.rundir import MIN_FREE_BYTES, RunDir, check_before_launch, check_writable, config_differences
from mauctl.engine.runtime import restarted
from mauctl.engine.schedule import describe_schedule
from mauctl.errors import UsageError
from mauctl.launch import Plan, in_worker, make_plan
from mauctl.moco import bn_splits
from mauctl.text import plural
from mauctl.weights import Encoder, check_resume_file, read_encoder


@dataclass
class Job:
    resolved: Resolved
    plan: Plan
    bn_splits: int
    train: FolderIndex | None  # None when no data was given to a dry run
    loss: str | None
    run_action: str = "new"  # new, resume or replace (see engine.rundir.check_before_launch)

    @property
    def config(self) -> PretrainConfig:
        return self.resolved.config  # type: ignore[return-value]

    @property
    def preset(self) -> str | None:
        return self.resolved.preset

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
    check_tensorboard(config)
    plan = make_plan(config.run, config.launch, config.optim, environ)
    check_rendezvous_port(config.launch, plan)
    splits = bn_splits(config.model.bn_splits, plan.per_process_batch(config.optim))
    check_encoder(config.model.arch, config.model.dim, config.model.mlp, config.model.small_stem,
                  config.data.image_size)
    train = None
    if config.data.root or (config.data.builtin and not dry_run):
        train = scan_split(data_root(config.data), "train")
    elif not config.data.builtin and not dry_run:
        raise UsageError("no training data: give a DATA folder (or data.root), or use --preset demo")
    if train is not None:
        check_splits(train, scan_split_if_present(data_root(config.data), "val"), "pretrain")
        _check_one_batch(train, config.optim.batch_size, "Lower --batch-size (and model.queue_size, a multiple of it)")
    job = Job(resolved, plan, splits, train, loss_name(config.loss))
    if owns_run_dir(config, environ):
        need = max(MIN_FREE_BYTES, int(1.1 * checkpoint_bytes(config)))
        job.run_action = _check_run_dir(config, overwrite, need)
        check_resume_file(config.run.resume, PRETRAIN_FORMAT)
    elif overwrite:
        raise UsageError("--overwrite is only honoured on node 0 (launch.node_rank = 0)")
    return job


def check_tensorboard(config: PretrainConfig | LinclsConfig) -> None:
    from mauctl.engine.progress import tensorboard_missing

    if config.run.tensorboard and tensorboard_missing():
        raise UsageError("run.tensorboard = true, but the tensorboard package is not installed",
                         hint="pip install 'mauctl[tensorboard]', or leave run.tensorboard off "
                              "(metrics.jsonl has every value).")


@dataclass
class BenchJob:
    config: PretrainConfig
    train: FolderIndex | None


def prepare_bench(*, preset: str | None, config_file: Path | None, loss: str | None, flags: Mapping[str, Any],
                  sets: Sequence[str], augmentations: Path | None = None,
                  environ: Mapping[str, str] | None = None) -> BenchJob:
    """Resolve and check what `mauctl bench` measures: a pretraining config, and its data if any."""
    resolved = load_config("pretrain", preset=preset, config_file=config_file, loss=loss, flags=flags, sets=sets,
                           environ=environ)
    config: PretrainConfig = resolved.config  # type: ignore[assignment]
    check_encoder(config.model.arch, config.model.dim, config.model.mlp, config.model.small_stem,
                  config.data.image_size)
    train = scan_split(data_root(config.data), "train") if config.data.root or config.data.builtin else None
    if augmentations is not None:
        if train is None:
            raise UsageError("--show-augmentations needs images: give DATA (or a preset with built-in data)")
        files.check_new_file(augmentations, "--show-augmentations")
    elif train is not None:
        _check_one_batch(train, config.optim.batch_size, "Lower --batch-size")
    return BenchJob(config, train)


def owns_run_dir(config: PretrainConfig | LinclsConfig, environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    if in_worker(environ):
        return int(environ["RANK"]) == 0
    return config.launch.node_rank == 0


def _check_run_dir(config: PretrainConfig | LinclsConfig, overwrite: bool, need_bytes: int = MIN_FREE_BYTES) -> str:
    """What to do with the run directory (see check_before_launch); refuse one we cannot write enough into.

    A worker group that torchrun restarted goes on with the run it started: no --overwrite again.
    """
    run = RunDir(Path(config.run.out))
    resume = config.run.resume
    if restarted():
        overwrite, resume = False, "auto"
    differences = []
    if run.config.is_file():
        previous = saved_config(read_toml(run.config))  # a run saved before a key existed: what it computed
        differences = config_differences(previous, config.model_dump())
    action = check_before_launch(run, resume, overwrite, differences)
    check_writable(run.path, need_bytes)
    return action


def checkpoint_bytes(config: PretrainConfig) -> int:
    """About how large a pretraining checkpoint is: both encoders, the SGD momentum, the queue (float32).

    A save writes the new file beside the old one, so this is the free space a run needs.
    """
    m = config.model
    with torch.device("meta"):
        encoder = build_encoder(m.arch, m.dim, m.mlp, m.small_stem)
    params = sum(p.numel() for p in encoder.parameters())
    buffers = sum(b.numel() for b in encoder.buffers())
    return 4 * (3 * params + 2 * buffers + m.queue_size * m.dim)


def dry_run_text(job: Job) -> str:
    """The resolved config as TOML, headed by the plan as comments: save it and pass it back with --config."""
    c = job.config
    per_process = job.plan.per_process_batch(c.optim)
    lines = [
        f"mauctl {__version__} pretrain --dry-run: nothing was trained or written.",
        f"preset: {job.preset or '-'}; loss column: {job.loss or 'custom (matches no published column)'}",
        f"world size: {job.plan.world_size} = {plural(job.plan.nnodes, 'node')} x "
        f"{plural(job.plan.nproc_per_node, 'process', 'processes')} "
        f"on {job.plan.device_type}" + (" (inside an existing torchrun/SLURM worker)" if job.plan.inside_worker else ""),
        f"batch: global {c.optim.batch_size}, per process {per_process}, "
        f"{plural(job.bn_splits, 'BatchNorm group')} of {per_process // job.bn_splits} per process",
        f"LR schedule: {describe_schedule(c.optim)}",
    ]
    if job.train is not None:
        steps = len(job.train.samples) // c.optim.batch_size
        lines.append(
            f"data: {job.train.root}: {plural(len(job.train.classes), 'class', 'classes')}, "
            f"{plural(len(job.train.samples), 'image')}, {plural(steps, 'step')} per epoch "
            f"({steps * c.optim.epochs:,} in all)"
        )
    elif c.data.builtin:
        lines.append(f"data: built-in '{c.data.builtin}' (materialised in the cache on the first run)")
    else:
        lines.append("data: not given (pass DATA to count classes, images and steps per epoch)")
    lines.append(f"speed: {describe_speed(c, job.plan.device_type)}")
    lines.append(f"diagnostics: {describe_eval(c, job.train)}")
    lines.append(f"checkpoints: {describe_checkpoints(c)}")
    action = {"new": "a new run", "resume": "would resume from its last checkpoint",
              "replace": "would start over, moving the old run aside"}[job.run_action]
    lines.append(f"run directory: {c.run.out} ({action})")
    return to_toml(c, "\n".join(lines), preset=job.preset)


def describe_speed(c: PretrainConfig, device_type: str) -> str:
    """What the "auto" speed switches become on ``device_type`` (the same rules as the workers')."""
    from mauctl.engine.runtime import precision_name, resolve_auto, resolve_dtype
    from mauctl.data.pipeline import pipeline_for

    device = torch.device(device_type)
    precision = precision_name(resolve_dtype(c.run.precision, device))
    on = {True: "on", False: "off"}
    return (f"{precision}, {pipeline_for(c, device_type)} data pipeline, "
            f"torch.compile {on[resolve_auto(c.run.compile, device)]}, "
            f"channels_last {on[resolve_auto(c.run.channels_last, device)]}")


def describe_checkpoints(c: PretrainConfig) -> str:
    kept = f"epoch_NNNN.pt kept every {plural(c.run.save_every, 'epoch')}" if c.run.save_every else "no others kept"
    return f"{_last_pt_every_epoch(c.run.save_minutes)}; {kept}"


def _last_pt_every_epoch(save_minutes: float) -> str:
    within = f"every {save_minutes:g} minutes within one" if save_minutes else "not within one"
    return f"last.pt after every epoch, {within}, and on a stop signal"


def describe_eval(c: PretrainConfig, train: FolderIndex | None) -> str:
    every: int | str = c.eval.every
    if every == 0:
        return "off (eval.every = 0)"
    if every == "auto":
        every = c.eval.every_for(len(train.samples)) if train is not None else "1 (up to 50,000 training images) or 10"
    knn = f"kNN top-1 (k {c.eval.knn_k}) against up to {c.eval.bank_images} train images" if c.eval.bank_images \
        else "no kNN"
    return (f"align / uniform metrics on up to {c.eval.images} held-out images and {knn}, before training and "
            f"every {plural(every, 'epoch') if isinstance(every, int) else every + ' epochs'}")


def check_rendezvous_port(launch: LaunchConfig, plan: Plan) -> None:
    """With one node and a rendezvous endpoint on this machine, its port must be free: this launcher hosts
    the rendezvous there. (torchrun would otherwise talk to whatever holds the port and fail minutes later.)

    Several nodes are left alone: another node's launcher on this machine may already host it.
    """
    if plan.inside_worker or launch.nnodes != 1 or not launch.rdzv_endpoint:
        return
    host, _, port = launch.rdzv_endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"launch.rdzv_endpoint = {launch.rdzv_endpoint!r}: cannot resolve {host!r} ({exc})",
                         hint="Give host:port of this machine, or leave rdzv_endpoint empty on one node.") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to torchrun too
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"launch.rdzv_endpoint = {launch.rdzv_endpoint!r}: port {port} is already in use on this machine "
                    "(another mauctl or torchrun job?)",
                    hint="Choose a free port, or leave launch.rdzv_endpoint empty on one node (a free port is "
                         "picked).") from None
            # another machine's address (EADDRNOTAVAIL) or one we may not bind: torchrun will say


def _check_one_batch(index: FolderIndex, batch_size: int, fix: str) -> None:
    if len(index.samples) < batch_size:
        raise UsageError(
            f"{index.root} has {plural(len(index.samples), 'image')}, fewer than one global batch "
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
                         "evaluate": self.evaluate, "preset": self.resolved.preset}}


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
    check_tensorboard(config)
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
    check_splits(train, val, "lincls")
    if evaluate and overwrite:
        raise UsageError("--evaluate and --overwrite contradict each other",
                         hint="--evaluate only evaluates the trained classifier; --overwrite starts the probe over.")
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
    check_rendezvous_port(config.launch, plan)
    if not evaluate:
        _check_one_batch(train, config.optim.batch_size, "Lower --batch-size")
    job = LinclsJob(resolved, plan, enc, root, train, val, name, evaluate)
    if not evaluate and owns_run_dir(config, environ):
        job.run_action = _check_run_dir(config, overwrite)
        check_resume_file(config.run.resume, LINCLS_FORMAT)
    return job


def lincls_dry_run_text(job: LinclsJob) -> str:
    """The probe's resolved config as TOML, headed by what it would read and write."""
    header = "\n".join([
        f"mauctl {__version__} lincls --dry-run: nothing was trained or written.",
        f"encoder: {job.encoder.arch} from {job.encoder.path} ({job.encoder.source})",
        f"data: {job.data_root}: {plural(len(job.train.classes), 'class', 'classes')}, {len(job.train.samples):,} train / "
        f"{len(job.val.samples)} val images",
        f"world size: {job.plan.world_size} on {job.plan.device_type}",
        f"protocol: {describe_probe(job.config, len(job.train.samples))}",
        f"LR schedule: {describe_schedule(job.config.optim)}",
        f"checkpoints: {describe_probe_checkpoints(job.config)}",
        f"output: {job.config.run.out}",
    ])
    return to_toml(job.config, header, preset=job.resolved.preset)


def describe_probe(c: LinclsConfig, train_images: int) -> str:
    """How the linear layer is trained: on which views, how many steps, evaluated on what."""
    p, size = c.lincls, c.data.image_size
    steps = train_images // c.optim.batch_size
    views = (f"random crops of {p.crop_scale:.0%} to 100% of the image"
             + (", mirrored half the time" if p.flip else ", never mirrored"))
    if not p.cached_features:
        how = f"per-epoch, as in main_lincls.py: every epoch reads the images again; training views are {views}"
    elif p.augmented_views == 0:
        how = "cached features of the centre crop, extracted once (report lists it apart)"
    else:
        how = (f"cached features of {plural(p.augmented_views, 'training view')} per image, extracted once "
               f"(report lists it apart); the views are {views}")
    return f"{how}; {plural(steps, 'step')} per epoch; evaluated on the {size}-px centre crop of val/"


def describe_probe_checkpoints(c: LinclsConfig) -> str:
    if c.lincls.cached_features:
        return ("last.pt after an epoch that is the best so far, after the last epoch, and otherwise at most once "
                "a minute (cached epochs take milliseconds); best.pt at the best epoch")
    return f"{_last_pt_every_epoch(c.run.save_minutes)}; best.pt at the best epoch"


def _default_lincls_out(enc: Encoder, name: str) -> Path:
    if enc.source == "mauctl-lincls":  # a probe's own checkpoint: its folder
        folder = enc.path.resolve().parent
        return folder.parent if folder.name == "checkpoints" else folder
    base = enc.run_dir or Path("runs") / f"{enc.path.stem}-lincls"
    return base / "lincls" / name
