"""The `mauctl` command line: parse, validate, then hand a config to a job or to the launcher.

Errors the user can fix are ``UsageError`` (exit 2) or ``RunError`` (exit 1), printed in one
paragraph ("error: ...") without a traceback, as are the command line's own errors (an unknown
option, a missing argument: exit 2); ``--debug`` (or ``MAUCTL_DEBUG=1``) adds the traceback and
keeps the exit status.

The flags that set one config key each (``--epochs``, ``--lr``, ...) are declared once, in
``FLAGS``, with the key's description from config.py as their help; each command names the ones
it takes (``@config_flags``) and receives their values as ``flags`` ({"section.key": value}).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mauctl import __version__
from mauctl.config import LinclsConfig, PretrainConfig, describe, field_annotation
from mauctl.errors import EXIT_STOPPED, MauctlError
from mauctl.text import plural

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_debug = {"on": os.environ.get("MAUCTL_DEBUG", "") not in ("", "0")}

# click's error class, whether Typer vendors click (0.2x) or depends on it
CommandLineError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _no_metavar(option: Any) -> Any:
    if option is not None:
        option.metavar = ""  # a flag takes no value: no "<bool>" beside --help
    return option


class Group(typer.core.TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _no_metavar(super().get_help_option(ctx))


class Command(typer.core.TyperCommand):
    """Help in the usual form: ``mauctl lincls [OPTIONS] SOURCE [DATA]``, ``--epochs N``, ``--force``."""

    def get_help_option(self, ctx: Any) -> Any:
        return _no_metavar(super().get_help_option(ctx))

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, typer.core.TyperOption) and param.metavar is None:
                param.metavar = "" if param.is_flag else TYPE_METAVARS.get(param.display_type(ctx), "VALUE")
            elif isinstance(param, typer.core.TyperArgument):
                param.display_type_rich = lambda ctx: None  # its NAME says it; no "<path>" or "<list[Path]>"
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = (param.metavar or param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


app = typer.Typer(
    name="mauctl",
    cls=Group,
    help="Pretrain image encoders with MoCo and the alignment/uniformity losses, probe, export, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def command(fn):
    """Register ``fn`` as a subcommand whose MauctlErrors become a message and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MauctlError as exc:
            if _debug["on"]:
                traceback.print_exc()
            print_error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if _debug["on"]:
                raise
            print_error(f"internal error: {exc.__class__.__name__}: {exc}",
                        "This is a bug in mauctl; rerun with --debug for the traceback and report it.")
            raise typer.Exit(1) from None

    return app.command(cls=Command)(wrapper)


def print_error(message: str, hint: str | None = None) -> None:
    """The one form of every error mauctl prints: "error: what", then what to do."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    if hint:
        err.print(hint, markup=False, highlight=False)


def _version(value: bool) -> None:
    if value:
        out.print(f"mauctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", metavar="", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _debug["on"] = debug or os.environ.get("MAUCTL_DEBUG", "") not in ("", "0")


# ---------------------------------------------------------------- options declared once

# flag -> the config key it sets
FLAGS = {
    "epochs": "optim.epochs", "batch_size": "optim.batch_size", "lr": "optim.lr", "arch": "model.arch",
    "image_size": "data.image_size", "workers": "data.workers", "pipeline": "data.pipeline", "seed": "run.seed",
    "device": "run.device", "out": "run.out", "resume": "run.resume", "nproc_per_node": "launch.nproc_per_node",
    "nnodes": "launch.nnodes", "node_rank": "launch.node_rank", "rdzv_endpoint": "launch.rdzv_endpoint",
    "max_restarts": "launch.max_restarts",
}
RUN_FLAGS = ("epochs", "batch_size", "lr", "image_size", "workers", "seed", "device", "out", "resume",
             "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "max_restarts")
METAVARS = {int: "N", float: "X", str: "TEXT"}
TYPE_METAVARS = {"<int>": "N", "<float>": "X", "<str>": "TEXT", "<path>": "PATH"}  # options declared without one


def config_flags(schema: type, names: tuple[str, ...], helps: dict[str, str] | None = None):
    """Add the flags ``names`` (see FLAGS) to a command; it gets their values as ``flags``.

    Each flag's help is the config key's description and default in ``schema`` (or ``helps[name]``).
    """
    def decorate(fn):
        signature = inspect.signature(fn, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "flags"]
        at = next((i + 1 for i, p in enumerate(params) if p.name == "sets"), len(params))  # listed after --set
        added = []
        for name in names:
            key = FLAGS[name]
            kind = field_annotation(schema, key)
            choices = get_args(kind) if get_origin(kind) is Literal else ()
            kind = kind if kind in METAVARS else str  # "auto"-or-number keys are read as text, checked by config.py
            metavar = "|".join(choices) if choices else METAVARS[kind]
            option = typer.Option(f"--{name.replace('_', '-')}", metavar=metavar, show_default=False,
                                  help=escape((helps or {}).get(name) or describe(schema, key)))
            added.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                           annotation=Annotated[Optional[kind], option]))
        params = params[:at] + added + params[at:]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, flags={FLAGS[n]: kwargs.pop(n) for n in names}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _data_flags(data: Optional[Path], flags: dict[str, Any]) -> dict[str, Any]:
    """DATA sets data.root (and turns a preset's built-in dataset off)."""
    if data is None:
        return flags
    return {**flags, "data.root": str(data.resolve()), "data.builtin": ""}


def _presets_of(command: str) -> str:
    from mauctl.presets import all_presets

    return ", ".join(p.name for p in all_presets() if p.command == command)


def _losses() -> str:
    from mauctl.presets import DEFAULT_LOSS, loss_columns

    return ", ".join(name + (" (default)" if name == DEFAULT_LOSS else "") for name in loss_columns())


Data = Annotated[Optional[Path], typer.Argument(
    metavar="DATA", show_default=False,
    help="Image folder with train/<class>/<image> (sets data.root; a preset may use a built-in dataset).")]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", metavar="FILE", help="TOML config laid over the preset (e.g. a --dry-run's output).")]
Sets = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override any config key, as section.key=value; repeatable, the value read as TOML "
         "(e.g. --set optim.cos=true).")]
PretrainPreset = Annotated[Optional[str], typer.Option(
    "--preset", metavar="NAME", show_default=False, help=f"Pretraining preset: {_presets_of('pretrain')}.")]
Loss = Annotated[Optional[str], typer.Option("--loss", metavar="NAME", show_default=False,
                                             help=f"Loss column: {_losses()}.")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", metavar="", help="Start over in a run directory that holds a run (the old one is moved aside).")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", metavar="", help="Resolve and check everything, print the plan and config as TOML, train nothing.")]


# ---------------------------------------------------------------- presets


@command
def presets(
    fmt: Annotated[str, typer.Option("--format", help="rich (a table) or json (a list of cells).")] = "rich",
) -> None:
    """List the presets and the published top-1 of each table cell they reproduce."""
    from mauctl import presets as p
    from mauctl.errors import UsageError

    if fmt not in ("rich", "json"):
        raise UsageError(f"--format {fmt!r}: expected rich or json")
    if fmt == "json":
        typer.echo(json.dumps(p.presets_data(), indent=2))
    else:
        p.render_presets(out)


# ---------------------------------------------------------------- pretrain


def _launch(job: Any) -> None:
    """Run a prepared job (here, or through the launcher) and leave with its exit status."""
    from mauctl.worker import start

    code = start(job)
    if code == EXIT_STOPPED:
        err.print(f"stopped; resume with the same command (exit status {EXIT_STOPPED})", highlight=False)
    raise typer.Exit(code)


@command
@config_flags(PretrainConfig, ("arch", *RUN_FLAGS))
def pretrain(
    data: Data = None,
    preset: PretrainPreset = None,
    config: ConfigFile = None,
    loss: Loss = None,
    sets: Sets = None,
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    flags: dict[str, Any] | None = None,
) -> None:
    """MoCo pretraining with the contrastive / alignment / uniformity losses."""
    from mauctl.prepare import dry_run_text, prepare_pretrain

    job = prepare_pretrain(preset=preset, config_file=config, loss=loss, flags=_data_flags(data, flags or {}),
                           sets=sets or [], dry_run=dry_run, overwrite=overwrite)
    if dry_run:
        typer.echo(dry_run_text(job), nl=False)
        return
    _launch(job)


# ---------------------------------------------------------------- subset


@command
def subset(
    imagenet_dir: Annotated[Path, typer.Argument(help="Existing ImageNet in the PyTorch layout (train/<wnid>/…).")],
    subset_dir: Annotated[Path, typer.Argument(help="Where to create the subset (created if missing).")],
    classes: Annotated[Optional[Path], typer.Option(
        help="Class list, one WordNet id (n + 8 digits) per line; default: the bundled ImageNet-100 list.")] = None,
    splits: Annotated[str, typer.Option(help="Comma-separated splits to build.")] = "train,val",
    link: Annotated[str, typer.Option(help="symlink (one link per class folder), hardlink or copy (per file).")]
    = "symlink",
    force: Annotated[bool, typer.Option("--force", help="Replace links that point elsewhere (never real files).")]
    = False,
) -> None:
    """Build ImageNet-100 (or any class subset) from an ImageNet tree, checking everything first."""
    from mauctl.subset import make_subset

    split_list = [s.strip() for s in splits.split(",") if s.strip()]
    summaries = make_subset(imagenet_dir, subset_dir, classes_file=classes, splits=split_list, link=link, force=force)
    table = Table(title=f"{subset_dir}", title_justify="left")
    for name in ("split", "classes", "images", "created", "already there"):
        table.add_column(name, justify="left" if name == "split" else "right")
    for s in summaries:  # created and already there with their unit: symlink mode counts class folders, the others files
        table.add_row(s.split, str(s.classes), str(s.images), s.entries(s.created), s.entries(s.existing))
    out.print(table)


# ---------------------------------------------------------------- lincls


@command
@config_flags(LinclsConfig, RUN_FLAGS, helps={
    "image_size": "Side of the square crop, in pixels (data.image_size; default: the pretraining run's).",
    "out": "Output directory (run.out; default: <run>/lincls/<name>)."})
def lincls(
    source: Annotated[Path, typer.Argument(
        metavar="SOURCE", show_default=False,
        help="A pretraining run directory or checkpoint (mauctl, original MoCo, or a torchvision state dict).")],
    data: Annotated[Optional[Path], typer.Argument(
        metavar="DATA", show_default=False,
        help="Folder with train/ and val/ (default: the pretraining run's dataset).")] = None,
    preset: Annotated[Optional[str], typer.Option(
        metavar="NAME", show_default=False,
        help=f"Probe preset: {_presets_of('lincls')} (default lincls, the published protocol).")] = None,
    config: ConfigFile = None,
    sets: Sets = None,
    name: Annotated[Optional[str], typer.Option(
        metavar="NAME", show_default=False,
        help="Name of this probe: results go to <run>/lincls/<name> (default: the preset's name).")] = None,
    evaluate: Annotated[bool, typer.Option(
        "--evaluate", metavar="", help="Only evaluate the trained classifier on val/.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", metavar="", help="Start this probe over (the old one is moved aside).")] = False,
    dry_run: DryRun = False,
    flags: dict[str, Any] | None = None,
) -> None:
    """Linear classification on frozen features (the original main_lincls.py protocol)."""
    from mauctl.prepare import lincls_dry_run_text, prepare_lincls

    job = prepare_lincls(source, preset=preset, config_file=config, flags=_data_flags(data, flags or {}),
                         sets=sets or [], name=name, evaluate=evaluate, overwrite=overwrite)
    if dry_run:
        typer.echo(lincls_dry_run_text(job), nl=False)
        return
    _launch(job)


# ---------------------------------------------------------------- report


@command
def report(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        help="Run directories, or folders to scan for them (default: runs/).", show_default=False)] = None,
    fmt: Annotated[str, typer.Option("--format", help="rich, markdown, csv or json.")] = "rich",
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", help="Write the report to this file (replaces only a file an earlier report wrote).")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also write a PNG: reproduced vs published top-1, and each run's uniformity vs alignment coloured by "
             "top-1 (needs matplotlib).")] = None,
) -> None:
    """The published accuracy table with your reproduced numbers beside the published ones."""
    from mauctl.report import run_report

    run_report(paths or [], fmt=fmt, out_file=out_file, plot=plot, console=out, err_console=err)


# ---------------------------------------------------------------- status


@command
def status(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        metavar="RUNS_OR_SWEEP", show_default=False,
        help="Run directories, sweep folders (with sweep.json), or folders to scan for them (default: runs/).")]
    = None,
    fmt: Annotated[str, typer.Option("--format", help="rich (a table that fits 80 columns), json or markdown.")]
    = "rich",
    watch: Annotated[bool, typer.Option(
        "--watch", metavar="", help="Show it again every --interval seconds (in a pipe: when it changed) until "
                                    "every row is finished or failed, or Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(metavar="SECONDS", help="How often --watch looks.")] = 10.0,
) -> None:
    """Where every run and sweep cell stands: state and SLURM job, epoch, img/s, ETA, loss, probe top-1."""
    from mauctl.status import run_status

    run_status(paths or [], fmt=fmt, watch=watch, interval=interval, console=out)


# ---------------------------------------------------------------- export


@command
def export(
    source: Annotated[Path, typer.Argument(
        help="A run directory, a linear-probe folder (<run>/lincls/NAME: its best.pt), or a pretraining, "
             "linear-probe, original MoCo or torchvision checkpoint.",
        show_default=False)],
    out_file: Annotated[Path, typer.Option(
        "--out", help="File to write (its folder is created if missing).", show_default=False)],
    fmt: Annotated[str, typer.Option(
        "--format", help="safetensors (rebuilt by mauctl / torch.hub), torchvision (a state dict for "
                         "torchvision.models), torchscript or onnx.")] = "safetensors",
    head: Annotated[Optional[str], typer.Option(
        help="none: backbone features; mlp: the pretraining projection, L2-normalised; linear: backbone + the "
             "lincls classifier. Default: linear for a linear-probe checkpoint or with --lincls, else none.",
        show_default=False)] = None,
    lincls: Annotated[Optional[str], typer.Option(
        "--lincls", help="For --head linear from a run: which <run>/lincls/NAME (default: the only one).",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Export the encoder for downstream use; the file is read back and must compute what the source does."""
    from mauctl.export import export_encoder

    done = export_encoder(source, out_file, fmt=fmt, head=head, lincls=lincls, force=force)
    table = Table(title=f"exported {escape(str(done.path))}", title_justify="left", show_header=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    size = done.size_bytes / 2**20
    rows = [
        ("source", str(done.source)), ("format", done.format), ("head", done.head), ("arch", done.arch),
        ("output", "(batch, " + ", ".join(map(str, done.output_shape[1:])) + ")"),
        ("size", f"{size:.1f} MiB" if size >= 0.1 else f"{done.size_bytes / 1024:.1f} KiB"),
        ("max abs diff", f"{done.max_abs_diff:.3g} (limit {done.limit:.3g}, reloaded vs source)"),
    ]
    if done.top1 is not None:
        rows.append(("lincls best top-1", f"{done.top1:.2f}"))
    for name, value in rows:
        table.add_row(name, escape(value))
    out.print(table)
    for note in done.notes:
        out.print(f"note: {escape(note)}", highlight=False)


# ---------------------------------------------------------------- bench


@command
@config_flags(PretrainConfig, ("batch_size", "arch", "image_size", "workers", "device", "pipeline"))
def bench(
    data: Data = None,
    preset: PretrainPreset = None,
    config: ConfigFile = None,
    loss: Loss = None,
    sets: Sets = None,
    steps: Annotated[int, typer.Option(metavar="N", min=1,
                                       help="Timed steps per measurement (after 3 warm-up steps).")] = 20,
    compare_pil: Annotated[bool, typer.Option(
        "--compare-pil", metavar="", help="Also measure the PIL pipeline (when the config uses the tensor one), "
                                          "or the tensor one when it uses PIL.")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the results as JSON.")] = False,
    show_augmentations: Annotated[Optional[Path], typer.Option(
        metavar="FILE.png", show_default=False,
        help="Write a PNG grid of augmented views, PIL beside tensor, of a few DATA images; measure nothing.")]
    = None,
    flags: dict[str, Any] | None = None,
) -> None:
    """Measure this machine: data pipeline, compute-only step and end-to-end images/s for a config."""
    from mauctl import bench as bench_module
    from mauctl.prepare import prepare_bench

    job = prepare_bench(preset=preset, config_file=config, loss=loss, flags=_data_flags(data, flags or {}),
                        sets=sets or [], augmentations=show_augmentations)
    if show_augmentations is not None:
        bench_module.write_augmentations(job, show_augmentations, err)
    else:
        bench_module.run_command(job, steps, compare_pil, as_json, out)


# ---------------------------------------------------------------- doctor


@command
def doctor(
    data: Data = None,
    smoke: Annotated[bool, typer.Option(
        "--smoke", metavar="", help="Also run the commands end to end on generated JPEGs, on the CPU and on CUDA "
                                    "when there is a GPU (about 2 minutes each).")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the checks as JSON.")] = False,
    preset: PretrainPreset = None,
    sets: Sets = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", metavar="DIR", show_default=False,
        help="Where runs will go: the free disk there is checked (default: runs/).")] = None,
    work: Annotated[Optional[Path], typer.Option(
        metavar="DIR", show_default=False,
        help="Keep the smoke test's files in this new folder (default: a temporary folder, removed after).")] = None,
) -> None:
    """Check this machine before a long run: versions, GPUs, limits, disk, data; --smoke runs every command."""
    from mauctl.config import load_config
    from mauctl.doctor import run_doctor
    from mauctl.errors import UsageError

    flags = {"data.root": str(data) if data else None, "run.out": str(out_dir) if out_dir else None}
    cfg = load_config("pretrain", preset=preset, flags=flags, sets=sets or []).config
    if work is not None and work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise UsageError(f"--work {work} already exists and is not an empty folder",
                         hint="Give a new folder: the smoke test writes runs and images there.")
    echo = (lambda line: err.print(line, markup=False, highlight=False)) if as_json else \
        (lambda line: out.print(line, markup=False, highlight=False))
    doc = run_doctor(cfg, data, smoke, work, echo)
    if as_json:
        out.file.write(doc.json())
    failed = [c.name for c in doc.checks if c.status == "FAIL"]
    if failed:
        err.print(f"doctor: {plural(len(failed), 'check')} failed: {', '.join(failed)}", highlight=False)
        raise typer.Exit(1)


# ---------------------------------------------------------------- sweep


@command
def sweep(
    data: Annotated[Optional[Path], typer.Argument(
        metavar="DATA", show_default=False,
        help="Image folder with train/ and val/ that every cell trains and probes on (--dry-run may leave it "
             "out).")] = None,
    presets: Annotated[Optional[str], typer.Option(
        metavar="P1,P2", show_default=False,
        help="Pretraining presets, comma-separated (default: the 6 rows of the ImageNet-100 table).")] = None,
    losses: Annotated[Optional[str], typer.Option(
        metavar="L1,L2", show_default=False, help="Loss columns, comma-separated (default: all 5).")] = None,
    seeds: Annotated[Optional[str], typer.Option(
        metavar="S1,S2", show_default=False, help="Seeds, e.g. 0,1,2 or 0-4 (default: 0).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder of the cells' runs and the "
                                          "plan file sweep.json.")] = Path("runs"),
    executor: Annotated[str, typer.Option(
        metavar="local|slurm", help="local: the cells one after another on this machine; slurm: a job "
                                    "array, a task per cell.")] = "local",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", metavar="", help="List the cells, their directories, commands and steps; run nothing.")] = False,
    bench_file: Annotated[Optional[Path], typer.Option(
        "--bench", metavar="FILE.json", show_default=False,
        help="With --dry-run: estimate GPU-hours from this `mauctl bench --json` result.")] = None,
    sets: Sets = None,
    probe_sets: Annotated[Optional[list[str]], typer.Option(
        "--probe-set", metavar="KEY=VALUE", help="Override a key of every cell's probe config (repeatable).")]
    = None,
    probe_preset: Annotated[Optional[str], typer.Option(
        metavar="NAME", show_default=False,
        help="Probe preset (default: the table's published protocol: lincls, or lincls-in1k for ImageNet).")]
    = None,
    nodes: Annotated[int, typer.Option(metavar="N", help="Nodes per cell (slurm).")] = 1,
    gpus_per_node: Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False,
        help="GPUs per node of a cell, 0 for the CPU (default: local: every visible GPU; slurm: 4).")] = None,
    cpus_per_task: Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False, help="CPUs per task (slurm; default: 8 per GPU, at least 2).")] = None,
    time_limit: Annotated[str, typer.Option(
        "--time", metavar="H:MM:SS", help="Time limit per task (slurm): each stop at it saves and requeues.")]
    = "24:00:00",
    partition: Annotated[Optional[str], typer.Option(metavar="NAME", show_default=False,
                                                     help="SLURM partition.")] = None,
    account: Annotated[Optional[str], typer.Option(metavar="NAME", show_default=False,
                                                   help="SLURM account.")] = None,
    max_parallel: Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False, help="Cells running at once (local default 1; slurm: the array's "
                                              "limit, default none).")] = None,
    sbatch_args: Annotated[Optional[list[str]], typer.Option(
        "--sbatch", metavar="KEY=VALUE",
        help="Any other sbatch option, e.g. --sbatch qos=high --sbatch constraint=a100 (repeatable).")] = None,
    max_requeues: Annotated[int, typer.Option(
        metavar="N", help="Time limits a task may reach (saving and requeuing each time) before it is "
                          "stopped for good (slurm).")] = 20,
) -> None:
    """Run or submit many table cells at once: each pretrains, then probes; idempotent (a plan in --out)."""
    import sys

    from mauctl.sweep import Resources, SweepRequest, parse_list, parse_seeds, parse_time, run_sweep

    resources = Resources(executor=executor, nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
                          time_min=parse_time(time_limit), partition=partition, account=account,
                          max_parallel=max_parallel, sbatch=_sbatch_args(sbatch_args or []),
                          max_requeues=max_requeues)
    request = SweepRequest(data=data, presets=parse_list(presets, "--presets"), losses=parse_list(losses, "--losses"),
                           seeds=parse_seeds(seeds), out=out_dir, sets=sets or [], probe_sets=probe_sets or [],
                           probe_preset=probe_preset, resources=resources, dry_run=dry_run, bench=bench_file,
                           argv=sys.argv)
    code = run_sweep(request, lambda line: out.print(line, markup=False, highlight=False))
    if code == EXIT_STOPPED:
        err.print(f"stopped; run the same mauctl sweep to go on (exit status {EXIT_STOPPED})", highlight=False)
    raise typer.Exit(code)


def _sbatch_args(items: list[str]) -> dict[str, Any]:
    from mauctl.errors import UsageError

    parsed: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.removeprefix("--").partition("=")
        if not key:
            raise UsageError(f"--sbatch {item!r}: expected an sbatch option as KEY=VALUE (or KEY for a flag)")
        parsed[key] = value if eq else True
    return parsed


# ---------------------------------------------------------------- demo


@command
def demo(
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the demo's runs.")] = Path("runs"),
    loss: Loss = None,
) -> None:
    """The whole chain on scikit-learn's digits, on a CPU, in minutes: pretrain, probe, export, report."""
    from mauctl.demo import Stopped, run_demo

    try:
        run_demo(out_dir, loss, console=out)
    except Stopped:
        err.print(f"stopped; run `mauctl demo` again to go on (exit status {EXIT_STOPPED})", highlight=False)
        raise typer.Exit(EXIT_STOPPED) from None


def main() -> None:
    """The console script: the command's exit status; the command line's own errors as "error:" lines (exit 2)."""
    try:
        code = app(prog_name="mauctl", standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except CommandLineError as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `mauctl` or `mauctl COMMAND` alone: the help
            typer.echo(ctx.get_help())
        else:
            where = f"mauctl {ctx.info_name}" if ctx is not None and ctx.parent is not None else "mauctl"
            print_error(exc.format_message(), f"Run '{where} --help' for the options.")
        code = exc.exit_code
    except typer.Abort:
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from mauctl.worker import fast_exit

    fast_exit(code)
