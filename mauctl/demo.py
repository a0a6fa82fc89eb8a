"""`mauctl demo`: the whole chain on scikit-learn's digits, on a CPU, in minutes.

pretrain (demo preset) -> linear probe (lincls-demo) -> export -> the same probe on a randomly
initialised encoder of the same architecture -> report. The pretrained encoder must beat the
random one: a demo that learns nothing is a failure, not a result.

Every stage is the command a user would run, through the same launcher; running the demo
again resumes or skips what is already done.

The demo's presets ask for ``run.precision = "bf16-native"``: on a CPU that computes bfloat16 in
hardware (AVX512-BF16 / AMX) every stage runs under bf16 autocast, both probes alike; elsewhere
fp32. ``<out>/demo-summary.json`` keeps what the final table shows, with each stage's seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from mauctl.backbone import build_encoder
from mauctl.engine.progress import read_metrics
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import precision_name
from mauctl.errors import EXIT_STOPPED, RunError, UsageError
from mauctl.prepare import prepare_lincls, prepare_pretrain
from mauctl.worker import start


class Stopped(Exception):
    """A stage stopped on a signal; the demo stops too (run it again to go on)."""


@dataclass
class Demo:
    out: Path
    loss: str | None = None
    console: Console = field(default_factory=Console)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def pretrain_dir(self) -> Path:
        return self.out / "demo"

    @property
    def random_dir(self) -> Path:
        return self.out / "demo-random-init"

    def stage(self, title: str) -> None:
        self.console.print(Rule(f"[bold]{title}"))

    def timed(self, name: str, action):
        start = time.perf_counter()
        result = action()
        self.timings[name] = time.perf_counter() - start
        return result

    def launch(self, job) -> None:
        code = start(job)
        if code == EXIT_STOPPED:
            raise Stopped()
        if code:
            raise RunError(f"the demo stopped: a stage exited with status {code}")

    def pretrain(self) -> None:
        self.stage("1/5 pretrain: MoCo with alignment + uniformity on the digits")
        job = prepare_pretrain(preset="demo", config_file=None, loss=self.loss,
                               flags={"run.out": str(self.pretrain_dir)}, sets=[])
        self.launch(job)

    def probe(self, source: Path, name: str, out: Path, data: Path | None = None,
              image_size: int | None = None) -> dict:
        flags = {"run.out": str(out), "data.root": str(data) if data else None, "data.image_size": image_size}
        job = prepare_lincls(source, preset="lincls-demo", config_file=None, flags=flags, sets=[], name=name)
        self.launch(job)
        return RunDir(out).read_json("results.json")

    def random_encoder(self) -> tuple[Path, Path, int]:
        """The same architecture, untrained (initialised with the run's seed), as a torchvision state dict."""
        run = RunDir(self.pretrain_dir)
        config = run.read_toml_config()
        model_cfg = config["model"]
        torch.manual_seed(config["run"]["seed"])
        model = build_encoder(model_cfg["arch"], model_cfg["dim"], model_cfg["mlp"], model_cfg["small_stem"])
        self.random_dir.mkdir(parents=True, exist_ok=True)
        path = self.random_dir / "encoder.pt"
        torch.save(model.state_dict(), path)
        manifest = run.read_json("manifest.json")
        return path, Path(manifest["dataset"]["root"]), config["data"]["image_size"]

    def export(self) -> Path:
        from mauctl.export import export_encoder

        self.stage("3/5 export: the backbone as safetensors, checked against the checkpoint")
        path = self.pretrain_dir / "export" / "encoder.safetensors"
        done = export_encoder(self.pretrain_dir, path, head="none", force=True)
        self.console.print(f"wrote {done.path} ({done.size_bytes / 2**20:.1f} MiB, {done.format}, head {done.head}); "
                           f"max abs diff after reloading: {done.max_abs_diff:.2e}", highlight=False)
        return path

    def report(self) -> None:
        from mauctl.report import run_report

        self.stage("5/5 report")
        run_report([self.pretrain_dir, self.random_dir], console=self.console)


def run_demo(out: Path, loss: str | None = None, console: Console | None = None) -> dict:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder", hint="Give a folder for the demo's runs.")
    demo = Demo(out, loss, console or Console())
    start = time.perf_counter()
    demo.timed("pretrain", demo.pretrain)
    demo.stage("2/5 linear probe of the pretrained encoder")
    trained = demo.timed("lincls", lambda: demo.probe(demo.pretrain_dir, "demo",
                                                      demo.pretrain_dir / "lincls" / "demo"))
    exported = demo.timed("export", demo.export)
    demo.stage("4/5 the same probe on a randomly initialised encoder")
    weights, data, size = demo.random_encoder()
    random = demo.timed("random init", lambda: demo.probe(weights, "random-init", demo.random_dir / "lincls",
                                                          data, size))
    demo.timed("report", demo.report)
    total = time.perf_counter() - start
    evals = [r for r in read_metrics(demo.pretrain_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    summary = {"pretrained_top1": trained["best_top1"], "random_top1": random["best_top1"],
               # before training (epochs_done 0) the query encoder is the random initialisation probed in stage 4
               "pretrained_diagnostics": _diagnostics(evals[-1] if evals else {}),
               "random_diagnostics": _diagnostics(evals[0] if evals and evals[0]["epochs_done"] == 0 else {}),
               "timings_s": demo.timings, "total_s": total, "run_dir": str(demo.pretrain_dir),
               "export": str(exported), "precision": _precision_used(demo.pretrain_dir)}
    RunDir(out).write_json(out / "demo-summary.json", summary)
    _print_summary(demo, summary)
    if trained["best_top1"] <= random["best_top1"]:
        raise RunError(
            f"the pretrained encoder ({trained['best_top1']:.2f}%) did not beat random initialisation "
            f"({random['best_top1']:.2f}%): pretraining learned nothing useful here",
            hint=f"Look at {demo.pretrain_dir / 'metrics.jsonl'} (a uniformity loss near 0 means collapse).",
        )
    return summary


def _precision_used(run_dir: Path) -> str | None:
    """The pretraining's compute precision ("fp32", "bf16"), as its manifest recorded it."""
    starts = RunDir(run_dir).read_json("manifest.json").get("starts") or [{}]
    dtype = getattr(torch, starts[-1].get("dtype", ""), None)
    return precision_name(dtype) if isinstance(dtype, torch.dtype) else None


def _diagnostics(record: dict) -> dict:
    return {k: record.get(k) for k in ("align_metric", "unif_metric", "knn_top1")}


def _print_summary(demo: Demo, summary: dict) -> None:
    table = Table(title="mauctl demo: the digits' val split (align / uniform: lower is better)", title_justify="left")
    for name in ("encoder", "linear top-1 (%)", "kNN top-1 (%)", "align", "uniform"):
        table.add_column(name, justify="left" if name == "encoder" else "right")
    table.add_column("where")

    def shown(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for label, top1, d, where in (
        ("pretrained (demo preset)", summary["pretrained_top1"], summary["pretrained_diagnostics"],
         demo.pretrain_dir / "lincls" / "demo" / "results.json"),
        ("random initialisation", summary["random_top1"], summary["random_diagnostics"],
         demo.random_dir / "lincls" / "results.json"),
    ):
        table.add_row(label, f"{top1:.2f}", shown(d["knn_top1"], 2), shown(d["align_metric"], 3),
                      shown(d["unif_metric"], 3), str(where))
    demo.console.print(table)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items())
    demo.console.print(f"time: {times}; total {summary['total_s']:.0f}s ({summary['precision']})", highlight=False)
    demo.console.print(f"run directory {summary['run_dir']}; exported encoder {summary['export']}", highlight=False)
