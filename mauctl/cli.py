"""The `mauctl` command line: parse, validate, then hand a config to a job or to the launcher.

Errors the user can fix are ``UsageError`` (exit 2) or ``RunError`` (exit 1), printed in one
paragraph without a traceback; ``--debug`` (or ``MAUCTL_DEBUG=1``) shows tracebacks.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mauctl import __version__
from mauctl.config import LinclsConfig, PretrainConfig, describe
from mauctl.errors import EXIT_STOPPED, MauctlError

app = typer.Typer(
    name="mauctl",
    help="Pretrain image encoders with MoCo and the alignment/uniformity losses, probe, export, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_debug = {"on": os.environ.get("MAUCTL_DEBUG", "") not in ("", "0")}


def command(fn):
    """Register ``fn`` as a subcommand whose MauctlErrors become a message and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MauctlError as exc:
            if _debug["on"]:
                raise
            err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
            if exc.hint:
                err.print(exc.hint, markup=False, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if _debug["on"]:
                raise
            err.print(f"[bold red]internal error:[/] {exc.__class__.__name__}: {escape(str(exc))}", highlight=False)
            err.print("This is a bug in mauctl; rerun with --debug for the traceback and report it.")
            raise typer.Exit(1) from None

    return app.command()(wrapper)


def _version(value: bool) -> None:
    if value:
        out.print(f"mauctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _debug["on"] = debug or os.environ.get("MAUCTL_DEBUG", "") not in ("", "0")


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
    """Run a prepared job through the launcher and leave with its exit status."""
    from mauctl.launch import execute

    code = execute(job.spec(), job.plan, job.config.launch, job.run_action)
    if code == EXIT_STOPPED:
        err.print(f"stopped; resume with the same command (exit status {EXIT_STOPPED})", highlight=False)
    raise typer.Exit(code)

def _help(key: str) -> str:
    return escape(describe(PretrainConfig, key))


@command
def pretrain(
    data: Annotated[Optional[Path], typer.Argument(help="Image folder with train/<class>/<image> (sets data.root).",
                                                   show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="Preset to start from (see `mauctl presets`).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML config laid over the preset.")] = None,
    loss: Annotated[Optional[str], typer.Option(
        help="Loss column: contr-t0.07, contr-t0.2, align2-unif2, align3-unif3 (the default values), align4-unif4."
    )] = None,
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override any key: --set section.key=value (repeatable; the value is read as TOML).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=_help("optim.epochs"), show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_help("optim.batch_size"), show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=_help("optim.lr"), show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option(help=_help("model.arch"), show_default=False)] = None,
    image_size: Annotated[Optional[int], typer.Option(help=_help("data.image_size"), show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help=_help("data.workers"), show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help=_help("run.seed"), show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help=_help("run.device"), show_default=False)] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help=_help("run.out"), show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(help=_help("run.resume"), show_default=False)] = None,
    nproc_per_node: Annotated[Optional[str], typer.Option(help=_help("launch.nproc_per_node"),
                                                          show_default=False)] = None,
    nnodes: Annotated[Optional[int], typer.Option(help=_help("launch.nnodes"), show_default=False)] = None,
    node_rank: Annotated[Optional[int], typer.Option(help=_help("launch.node_rank"), show_default=False)] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(help=_help("launch.rdzv_endpoint"),
                                                         show_default=False)] = None,
    max_restarts: Annotated[Optional[int], typer.Option(help=_help("launch.max_restarts"),
                                                        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over in a run directory that holds a run (the old run is moved aside).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Resolve and check everything, print it, train nothing.")] = False,
) -> None:
    """MoCo pretraining with the contrastive / alignment / uniformity losses."""
    from mauctl.prepare import dry_run_text, prepare_pretrain

    flags = {
        "data.root": str(data.resolve()) if data is not None else None,
        "data.builtin": "" if data is not None else None,
        "optim.epochs": epochs, "optim.batch_size": batch_size, "optim.lr": lr, "model.arch": arch,
        "data.image_size": image_size, "data.workers": workers, "run.seed": seed, "run.device": device,
        "run.out": out_dir, "run.resume": resume, "launch.nproc_per_node": nproc_per_node,
        "launch.nnodes": nnodes, "launch.node_rank": node_rank, "launch.rdzv_endpoint": rdzv_endpoint,
        "launch.max_restarts": max_restarts,
    }
    job = prepare_pretrain(preset=preset, config_file=config, loss=loss, flags=flags, sets=sets or [],
                           dry_run=dry_run, overwrite=overwrite)
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
    for s in summaries:
        table.add_row(s.split, str(s.classes), str(s.images), str(s.created), str(s.existing))
    out.print(table)


# ---------------------------------------------------------------- lincls


def _lhelp(key: str) -> str:
    return escape(describe(LinclsConfig, key))


@command
def lincls(
    source: Annotated[Path, typer.Argument(
        help="A pretraining run directory or checkpoint (mauctl, original MoCo, or a torchvision state dict).",
        show_default=False)],
    data: Annotated[Optional[Path], typer.Argument(
        help="Folder with train/ and val/ (default: the pretraining run's dataset).", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="lincls (default) or lincls-in1k.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML config laid over the preset.")] = None,
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override any key: --set section.key=value (repeatable).")] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Name of this probe: results go to <run>/lincls/<name> (default: the preset's name).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=_lhelp("optim.epochs"), show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_lhelp("optim.batch_size"), show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=_lhelp("optim.lr"), show_default=False)] = None,
    image_size: Annotated[Optional[int], typer.Option(
        help=escape("Side of the square crop, in pixels (default: the pretraining run's)."), show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help=_lhelp("data.workers"), show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help=_lhelp("run.seed"), show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help=_lhelp("run.device"), show_default=False)] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Output directory (default: <run>/lincls/<name>).",
                                                   show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(help=_lhelp("run.resume"), show_default=False)] = None,
    nproc_per_node: Annotated[Optional[str], typer.Option(help=_lhelp("launch.nproc_per_node"),
                                                          show_default=False)] = None,
    nnodes: Annotated[Optional[int], typer.Option(help=_lhelp("launch.nnodes"), show_default=False)] = None,
    node_rank: Annotated[Optional[int], typer.Option(help=_lhelp("launch.node_rank"), show_default=False)] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(help=_lhelp("launch.rdzv_endpoint"),
                                                         show_default=False)] = None,
    max_restarts: Annotated[Optional[int], typer.Option(help=_lhelp("launch.max_restarts"),
                                                        show_default=False)] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Only evaluate the trained classifier on val/.")]
    = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start this probe over (the old one is moved aside).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Resolve and check everything, print it, train nothing.")]
    = False,
) -> None:
    """Linear classification on frozen features (the original main_lincls.py protocol)."""
    from mauctl.prepare import lincls_dry_run_text, prepare_lincls

    flags = {
        "data.root": str(data.resolve()) if data is not None else None,
        "data.builtin": "" if data is not None else None,
        "optim.epochs": epochs, "optim.batch_size": batch_size, "optim.lr": lr, "data.image_size": image_size,
        "data.workers": workers, "run.seed": seed, "run.device": device, "run.out": out_dir, "run.resume": resume,
        "launch.nproc_per_node": nproc_per_node, "launch.nnodes": nnodes, "launch.node_rank": node_rank,
        "launch.rdzv_endpoint": rdzv_endpoint, "launch.max_restarts": max_restarts,
    }
    job = prepare_lincls(source, preset=preset, config_file=config, flags=flags, sets=sets or [], name=name,
                         evaluate=evaluate, overwrite=overwrite)
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
def bench(
    data: Annotated[Optional[Path], typer.Argument(help="Image folder with train/<class>/<image> (sets data.root).",
                                                   show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="Pretraining preset to measure (see `mauctl presets`).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML config laid over the preset.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Loss column (see `mauctl pretrain --help`).")] = None,
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override any key: --set section.key=value (e.g. run.precision=bf16, run.compile=true).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_help("optim.batch_size"), show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option(help=_help("model.arch"), show_default=False)] = None,
    image_size: Annotated[Optional[int], typer.Option(help=_help("data.image_size"), show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help=_help("data.workers"), show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help=_help("run.device"), show_default=False)] = None,
    pipeline: Annotated[Optional[str], typer.Option(help=_help("data.pipeline"), show_default=False)] = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per measurement (after 3 warm-up steps).")] = 20,
    compare_pil: Annotated[bool, typer.Option(
        "--compare-pil", help="Also measure the PIL pipeline (when the config uses the tensor one), or the "
                              "tensor one when it uses PIL.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    show_augmentations: Annotated[Optional[Path], typer.Option(
        help="Write a PNG grid of augmented views, PIL beside tensor, of a few DATA images; measure nothing.",
        show_default=False)] = None,
) -> None:
    """Measure this machine: data pipeline, compute-only step and end-to-end images/s for a config."""
    from mauctl.prepare import prepare_bench

    flags = {
        "data.root": str(data.resolve()) if data is not None else None,
        "data.builtin": "" if data is not None else None,
        "optim.batch_size": batch_size, "model.arch": arch, "data.image_size": image_size, "data.workers": workers,
        "run.device": device, "data.pipeline": pipeline,
    }
    job = prepare_bench(preset=preset, config_file=config, loss=loss, flags=flags, sets=sets or [],
                        augmentations=show_augmentations)
    from mauctl import bench as bench_module

    if show_augmentations is not None:
        from mauctl.data.batch_augment import augmentation_grid

        paths = bench_module.sample_paths(job.train, 6)
        augmentation_grid(paths, job.config.data.aug, job.config.data.image_size, show_augmentations)
        err.print(f"wrote {show_augmentations}: {len(paths)} images, 4 views each by the PIL recipe (left) and the "
                  "tensor pipeline (right), the same random choices column by column", highlight=False)
        return
    from mauctl.engine import runtime
    from mauctl.pretrain import pipeline_for

    rt = runtime.start(job.config.run.device, job.config.run.precision)
    try:
        used = pipeline_for(job.config, rt.device.type)
        pipelines = [used] + ([{"pil": "tensor", "tensor": "pil"}[used]] if compare_pil else [])
        result = bench_module.run_bench(job.config, rt, job.train, steps, pipelines)
    finally:
        rt.close()
    if as_json:
        typer.echo(bench_module.render_json(result), nl=False)
    else:
        bench_module.render_table(result, out)


# ---------------------------------------------------------------- demo


@command
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the demo's runs.")] = Path("runs"),
    loss: Annotated[Optional[str], typer.Option(help="Loss column to pretrain with (default align3-unif3).")]
    = None,
) -> None:
    """The whole chain on scikit-learn's digits, on a CPU, in minutes: pretrain, probe, export, report."""
    from mauctl.demo import Stopped, run_demo

    try:
        run_demo(out_dir, loss, console=out)
    except Stopped:
        err.print(f"stopped; run `mauctl demo` again to go on (exit status {EXIT_STOPPED})", highlight=False)
        raise typer.Exit(EXIT_STOPPED) from None


def main() -> None:
    try:
        app(prog_name="mauctl")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from mauctl.worker import fast_exit

    fast_exit(code)
