"""`mauctl report`: the published accuracy table with the user's reproduced numbers beside it.

Reading order: ``collect`` finds the linear-probe results under run directories (one
``Entry`` per run and probe), ``match`` puts an entry in a cell of the table by what its
pretraining config computes and lists every way it departs from the published protocol,
``build_tables`` lays out the tables, and one renderer per format writes them.

An entry goes into a cell only when it follows the published protocol exactly; an entry that
is close to a cell but differs ("Not in the table") or that belongs to no cell ("Other runs")
is listed apart with its reasons, never averaged into a published cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from mauctl import files, presets
from mauctl.compat import tomllib
from mauctl.config import LINCLS_OPTIM, LossConfig, PretrainConfig, loss_name, saved_config
from mauctl.data.folder import class_list_digest
from mauctl.engine.progress import read_metrics
from mauctl.errors import UsageError
from mauctl.terminal import bullets, emphasis_name, emphasised, fits, paragraph

FORMATS = ("rich", "markdown", "csv", "json")
RESULTS_FORMAT = "mauctl.lincls-results/"
REPORT_FORMAT = "mauctl.report/1"
TITLE = "mauctl report: published vs reproduced linear top-1 (%)"
MARKDOWN_MARKER = f"<!-- {TITLE} -->"
CSV_FIELDS_1 = ["kind", "table", "row", "loss", "published", "label", "reproduced_mean", "reproduced_std", "n",
                "diff", "best", "run", "probe", "best_top1", "top5", "reasons"]  # before the diagnostics
DIAGNOSTICS = ("align_metric", "unif_metric", "knn_top1")  # the pretraining run's last `eval` record
RUN_DIAGNOSTICS = (*DIAGNOSTICS, "collapsed_epoch")  # and the epoch of its collapse warning, if any
CSV_FIELDS = CSV_FIELDS_1 + list(RUN_DIAGNOSTICS)
AUG_LABELS = {"v1": "Normal", "v2": "Strong Aug. + MLP Head + Cosine LR"}
OFF = "†"  # marks a cell that has runs listed under "Not in the table", and those runs


def legend(bold: str = "Bold") -> str:
    """What the cells say; ``bold`` names the mark of a row's best (bold is invisible in a pipe)."""
    return (f"Published / reproduced (difference); reproduced = best top-1 of the linear probe, mean ± std "
            f"over seeds. {bold}: best of the row (reproduced when the row has runs, else published). "
            f"{OFF}: runs listed under \"Not in the table\".")

# How each departure from the published protocol is said: "{have}, not {want}", or for a boolean
# key the phrase for (have true, have false). The pretraining keys are the protocol besides the
# row (aug, batch, LR) and the loss column; the probe keys are those of main_lincls.
PROTOCOL_PHRASES = {
    "optim.epochs": "pretrained {have} epochs, not {want}",
    "model.arch": "architecture {have}, not {want}",
    "data.image_size": "pretraining image size {have}, not {want}",
    "model.dim": "feature dim {have}, not {want}",
    "model.mlp": ("MLP head, not a linear one", "linear head, not the MLP head"),
    "model.queue_size": "queue {have}, not {want}",
    "model.key_momentum": "key momentum {have}, not {want}",
    "model.small_stem": ("small-image ResNet stem", "standard ResNet stem, not the small-image one"),
    "optim.cos": ("cosine LR, not the step schedule", "step LR, not cosine"),
    "optim.schedule": "LR drops at epochs {have}, not {want}",
    "optim.momentum": "SGD momentum {have}, not {want}",
    "optim.weight_decay": "weight decay {have}, not {want}",
}
PROBE_PHRASES = {
    "epochs": "probe: {have} epochs, not {want}",
    "lr": "probe: LR {have}, not {want}",
    "batch_size": "probe: batch {have}, not {want}",
    "schedule": "probe: LR drops at epochs {have}, not {want}",
    "cos": ("probe: cosine LR, not the step schedule", "probe: step LR, not cosine"),
    "momentum": "probe: momentum {have}, not {want}",
    "weight_decay": "probe: weight decay {have}, not {want}",
    "image_size": "probe: image size {have}, not {want}",
    "crop_scale": "probe: training crops from {have} of the image, not {want}",
    "flip": ("probe: flipped training views", "probe: no flipped training views"),
}
# results written before these keys existed used main_lincls's values
PROBE_DEFAULTS = {"crop_scale": 0.08, "flip": True}


# ---------------------------------------------------------------- collect


@dataclass
class Entry:
    """One linear-probe result and the pretraining run it evaluates."""

    results_path: Path
    results: dict[str, Any]
    run: Path | None  # the run directory, None for a checkpoint from elsewhere
    config: dict[str, Any] | None  # the pretraining config: results' pretrain.config, else the run's config.toml
    manifest: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # the run's last `eval` record in metrics.jsonl
    collapse: dict[str, Any] = field(default_factory=dict)  # its first collapse warning there, if any

    @property
    def collapsed_epoch(self) -> int | None:
        """The epoch (1-based, as the progress line shows it) in which the run collapsed, None if it did not."""
        epoch = self.collapse.get("epoch")
        return epoch + 1 if isinstance(epoch, int) else None

    @property
    def probe(self) -> str:
        return str(self.results.get("name") or self.results_path.parent.name)

    @property
    def best_top1(self) -> float | None:
        return number(self.results.get("best_top1", self.results.get("top1")))

    @property
    def top5(self) -> float | None:
        return number(self.results.get("top5"))

    @property
    def label(self) -> str:
        """The run directory; for a checkpoint from elsewhere, the checkpoint when its stored path is
        absolute, else the folder the results lie in. A relative stored path is relative to wherever
        the probe ran (the demo's folder, say), which says nothing about where the report runs."""
        if self.run is not None:
            return shown_path(self.run)
        checkpoint = (self.results.get("pretrain") or {}).get("path")
        if checkpoint and Path(checkpoint).is_absolute():
            return shown_path(Path(checkpoint))
        return shown_path(self.results_path.parent)


def collect(paths: Sequence[Path], notes: list[str] | None = None) -> list[Entry]:
    """Every (run, probe) under ``paths``: run directories, results.json files, or folders to scan."""
    notes = [] if notes is None else notes
    runs: list[Path] = []
    loose: list[Path] = []  # results.json outside a run's lincls/ (probes of other checkpoints)
    for path in paths:
        if path.is_file():
            loose.append(path)
        elif is_run(path):
            runs.append(path)
        else:
            _scan(path, runs, loose)
    entries: dict[Path, Entry] = {}
    unprobed = []
    for run in dict.fromkeys(runs):
        found = sorted((run / "lincls").rglob("results.json")) if (run / "lincls").is_dir() else []
        for results_path in found:
            entry = _read_entry(results_path, run, notes)
            if entry is not None:
                entries.setdefault(results_path.resolve(), entry)
        if not found:
            unprobed.append(shown_path(run))
    for results_path in loose:
        entry = _read_entry(results_path, None, notes)
        if entry is not None:
            entries.setdefault(results_path.resolve(), entry)
    if unprobed:
        notes.append(f"{len(unprobed)} run(s) without linear-probe results yet (`mauctl lincls RUN` adds them): "
                     + ", ".join(unprobed) + ".")
    return sorted(entries.values(), key=lambda e: (e.label, e.probe, str(e.results_path)))


def is_run(path: Path) -> bool:
    """A pretraining run directory. A probe's own folder has the same files, with command "lincls"."""
    if not ((path / "config.toml").is_file() and (path / "manifest.json").is_file()):
        return False
    try:
        command = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("command")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return True  # unreadable: collect() reports it
    return command in (None, "pretrain")


def walk(root: Path) -> Iterator[tuple[Path, list[str], bool]]:
    """Each folder under ``root`` with its file names and whether it is a pretraining run directory.

    A run directory is not entered (its probes are under lincls/); hidden folders and runs moved aside
    by `pretrain --overwrite` (replaced by their user) are skipped.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        run = is_run(here)
        yield here, filenames, run
        dirnames[:] = [] if run else sorted(d for d in dirnames if not d.startswith(".") and ".replaced-" not in d)


def _scan(root: Path, runs: list[Path], loose: list[Path]) -> None:
    for here, filenames, run in walk(root):
        if run:
            runs.append(here)
        elif "results.json" in filenames:
            loose.append(here / "results.json")


def _read_entry(results_path: Path, run: Path | None, notes: list[str]) -> Entry | None:
    results = read_json(results_path, notes)
    if results is None:
        return None
    if not str(results.get("format", "")).startswith(RESULTS_FORMAT):
        if run is not None:
            notes.append(f"skipped {shown_path(results_path)}: not a mauctl linear-probe results file.")
        return None
    pretrain = results.get("pretrain") or {}
    if run is None and pretrain.get("run_dir") and is_run(Path(pretrain["run_dir"])):
        run = Path(pretrain["run_dir"])
    manifest, status, run_config = {}, {}, None
    if run is not None:
        manifest = read_json(run / "manifest.json", notes) or {}
        status = read_json(run / "status.json", notes, missing_ok=True) or {}
        try:
            run_config = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            notes.append(f"cannot read {shown_path(run / 'config.toml')}: {exc}.")
    config = pretrain.get("config") or run_config
    config = saved_config(config) if isinstance(config, dict) else None
    records = read_metrics(run / "metrics.jsonl") if run is not None else []
    evals = [r for r in records if r.get("kind") == "eval"]
    collapses = [r for r in records if r.get("kind") == "warning" and r.get("what") == "collapse"]
    return Entry(results_path, results, run, config, manifest, status, evals[-1] if evals else {},
                 collapses[0] if collapses else {})


def read_json(path: Path, notes: list[str], missing_ok: bool = False) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not missing_ok:
            notes.append(f"skipped {shown_path(path)}: no such file.")
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"skipped {shown_path(path)}: not readable JSON ({exc.__class__.__name__}).")
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- match


class CellKey(NamedTuple):
    table: str  # "imagenet100" or "imagenet"
    row: str  # the reference row, e.g. "v2-b256"
    loss: str  # the loss column, e.g. "align3-unif3"


def match(entry: Entry) -> tuple[CellKey | None, list[str]]:
    """The cell the entry's pretraining computes, and every way the entry departs from its protocol.

    (None, reasons why it is no cell) when it matches no cell at all.
    """
    config = entry.config
    if config is None:
        source = (entry.results.get("pretrain") or {}).get("source") or "unknown"
        return None, [f"no pretraining config ({source} checkpoint)"]
    table, dataset_reasons = _table_of(entry)
    row = _row_of(table, config)
    loss, loss_reasons = _loss_of(config)
    if table is None or row is None or loss is None:
        why = dataset_reasons if table is None else []
        if row is None:
            aug, batch, lr = (_show(_get(config, k)) for k in ("data.aug", "optim.batch_size", "optim.lr"))
            where = f" on {presets.TABLES[table]}" if table else ""
            why.append(f"no published row for aug {aug}, batch {batch}, LR {lr}{where}")
        why += loss_reasons if loss is None else []
        return None, why
    key = CellKey(table, row, loss)
    return key, dataset_reasons + loss_reasons + _pretrain_reasons(entry, key) + _probe_reasons(entry, key)


@cache
def imagenet100_digest() -> str:
    return class_list_digest(sorted(presets.resource_text("imagenet100_classes.txt").split()))


def _table_of(entry: Entry) -> tuple[str | None, list[str]]:
    dataset = entry.manifest.get("dataset")
    reasons = []
    if not isinstance(dataset, dict):
        # no manifest: the probe's dataset stands in, which the published protocol does not guarantee
        dataset = ((entry.results.get("protocol") or {}).get("dataset")) or {}
        reasons.append("pretraining dataset unknown (no manifest.json)")
    if dataset.get("class_list_sha256") == imagenet100_digest():
        return "imagenet100", reasons
    if dataset.get("classes") == 1000:
        return "imagenet", reasons
    classes = dataset.get("classes")
    what = f"{classes} classes" if classes is not None else "unknown classes"
    return None, reasons + [f"dataset: {what}, not ImageNet-100 or ImageNet"]


def _row_of(table: str | None, config: dict[str, Any]) -> str | None:
    """The reference row with the config's augmentation, global batch and LR (in any table when unknown)."""
    for name in [table] if table else list(presets.TABLES):
        for row in presets.reference_table()[name]:
            if all(_same(row[k], _get(config, dotted)) for k, dotted in
                   (("aug", "data.aug"), ("batch_size", "optim.batch_size"), ("lr", "optim.lr"))):
                return row["row"]
    return None


def _loss_of(config: dict[str, Any]) -> tuple[str | None, list[str]]:
    try:
        loss = LossConfig(**(config.get("loss") or {}))
    except (ValidationError, TypeError):
        return None, ["loss config not readable"]
    name = loss_name(loss)
    if name is not None:
        return name, []
    # a published column but for how L_uniform was taken: its cell, and how it departs from it
    published = {"intra_batch": (True, "uniformity over the queue only (Eq. 17); the table uses Eq. 18"),
                 "unif_groups": ("bn", "uniformity over the global batch at once; the table's is per GPU")}
    departs = {key: want for key, (want, _) in published.items() if getattr(loss, key) != want}
    near = loss_name(loss.model_copy(update=departs)) if departs else None
    if near is not None:
        return near, [published[key][1] for key in departs]
    return None, ["loss matches no published column"]


@cache
def row_protocol(table: str, row: str) -> dict[str, Any]:
    """The pretraining values the published row was computed with: its preset over the defaults."""
    preset = next((p for p in presets.all_presets() if p.reference == (table, row)), None)
    values = preset.values if preset else {}
    return {dotted: _get(values, dotted) for dotted in PROTOCOL_PHRASES}


@cache
def probe_protocol(table: str, row: str) -> dict[str, Any]:
    """main_lincls's protocol: the `lincls` preset over the linear-probe defaults; images the size the
    row was pretrained at unless the preset sets one."""
    values = presets.load_preset("lincls").values
    optim = {**LINCLS_OPTIM.model_dump(), **values.get("optim", {})}
    image_size = values.get("data", {}).get("image_size", row_protocol(table, row)["data.image_size"])
    lincls = {**PROBE_DEFAULTS, **values.get("lincls", {})}
    return {**{k: optim[k] for k in PROBE_PHRASES if k not in ("image_size", *PROBE_DEFAULTS)},
            "image_size": image_size, **{k: lincls[k] for k in PROBE_DEFAULTS}}


def _pretrain_reasons(entry: Entry, key: CellKey) -> list[str]:
    config = entry.config or {}
    reasons = []
    expected = row_protocol(key.table, key.row)
    for dotted, want in expected.items():
        if dotted == "optim.schedule" and expected["optim.cos"]:
            continue  # the cosine schedule has no drops
        have = _get(config, dotted)
        if not _same(have, want):
            reasons.append(_differs(PROTOCOL_PHRASES[dotted], have, want))
    if entry.run is None:
        reasons.append("pretraining status unknown (no run directory)")
    elif entry.status.get("state") != "finished":
        reasons.append(f"pretraining not finished (state {entry.status.get('state') or 'unknown'})")
    epoch = (entry.results.get("pretrain") or {}).get("epoch")
    if isinstance(epoch, int) and not _same(epoch, _get(config, "optim.epochs")):
        reasons.append(f"probed the epoch-{epoch} checkpoint, not the last one")
    return reasons


def _probe_reasons(entry: Entry, key: CellKey) -> list[str]:
    protocol = entry.results.get("protocol")
    if not isinstance(protocol, dict):
        return ["probe protocol not recorded"]
    reasons = []
    kind = protocol.get("kind")
    if kind != "per-epoch":
        reasons.append(f"probe: {kind.replace('-', ' ')}" if isinstance(kind, str) else "probe: kind not recorded")
    for name, want in probe_protocol(key.table, key.row).items():
        have = protocol.get(name, PROBE_DEFAULTS.get(name))
        if not _same(have, want):
            reasons.append(_differs(PROBE_PHRASES[name], have, want))
    if entry.results.get("finished") is not True:
        done, planned = entry.results.get("epochs_done", "?"), protocol.get("epochs", "?")
        reasons.append(f"probe unfinished ({done}/{planned} epochs)")
    probe_digest = (protocol.get("dataset") or {}).get("class_list_sha256")
    pretrain_digest = (entry.manifest.get("dataset") or {}).get("class_list_sha256")
    if probe_digest and pretrain_digest and probe_digest != pretrain_digest:
        reasons.append("probe classes differ from the pretraining classes")
    if entry.best_top1 is None:
        reasons.append("no top-1 recorded")
    return reasons


def _differs(phrase: str | tuple[str, str], have: Any, want: Any) -> str:
    if isinstance(phrase, tuple):
        return phrase[0] if have else phrase[1]
    return phrase.format(have=_show(have), want=_show(want))


def _get(config: dict[str, Any], dotted: str) -> Any:
    """``section.key`` of a config dict, or the schema default when the key is absent."""
    section, key = dotted.split(".")
    values = config.get(section) or {}
    if key in values:
        return values[key]
    return getattr(PretrainConfig.model_fields[section].default, key)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return "?" if value is None else str(value)


def number(value: Any) -> float | None:
    """A JSON number as a float (not a bool); None for anything else."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shown_path(path: Path) -> str:
    """Relative to the working directory when under it (shorter, and the same on every machine)."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return absolute.as_posix()


# ---------------------------------------------------------------- tables


@dataclass
class Cell:
    """A cell of the report: the published number and the user's runs that reproduce it."""

    published: presets.PublishedCell
    entries: list[Entry] = field(default_factory=list)  # the published protocol, exactly
    off_protocol: list[Entry] = field(default_factory=list)  # listed under "Not in the table"
    best: bool = False  # of its row: by reproduced mean when the row has runs, else by published top-1

    @property
    def key(self) -> CellKey:
        return CellKey(self.published.table, self.published.row, self.published.loss)

    @property
    def values(self) -> list[float]:
        return [e.best_top1 for e in self.entries if e.best_top1 is not None]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def diff(self) -> float | None:
        top1 = self.published.top1
        return None if self.mean is None or top1 is None else self.mean - top1


@dataclass
class Row:
    table: str
    name: str
    aug: str
    batch_size: int
    lr: float
    cells: list[Cell]


@dataclass
class Report:
    tables: dict[str, list[Row]]
    not_in_table: list[tuple[Entry, CellKey, list[str]]]
    other: list[tuple[Entry, list[str]]]
    notes: list[str]
    entries: list[Entry] = field(default_factory=list)  # every run and probe, in collect()'s order

    def cell(self, key: CellKey) -> Cell:
        row = next(r for r in self.tables[key.table] if r.name == key.row)
        return next(c for c in row.cells if c.key.loss == key.loss)

    def cells(self) -> list[Cell]:
        return [c for rows in self.tables.values() for r in rows for c in r.cells]


def build_tables(entries: Sequence[Entry], notes: Sequence[str] = ()) -> Report:
    reference = presets.reference_table()
    published = presets.published_cells()
    tables = {}
    for table in presets.TABLES:
        tables[table] = [
            Row(table, row["row"], row["aug"], row["batch_size"], row["lr"],
                [Cell(c) for c in published if (c.table, c.row) == (table, row["row"])])
            for row in reference[table]
        ]
    report = Report(tables, [], [], list(notes), list(entries))
    for entry in entries:
        key, reasons = match(entry)
        if key is None:
            report.other.append((entry, reasons))
        elif reasons:
            report.not_in_table.append((entry, key, reasons))
            report.cell(key).off_protocol.append(entry)
        else:
            report.cell(key).entries.append(entry)
    for rows in tables.values():
        for row in rows:
            _mark_best(row)
    if not entries:
        report.notes.append("No finished runs were found: only the published numbers are shown.")
    return report


def _mark_best(row: Row) -> None:
    reproduced = [c for c in row.cells if c.mean is not None]
    if reproduced:
        top = max(c.mean for c in reproduced)
        for c in reproduced:
            c.best = math.isclose(c.mean, top)
    elif any(c.published.best for c in row.cells):  # the README marks the row's best
        for c in row.cells:
            c.best = c.published.best
    else:
        published = [c for c in row.cells if c.published.top1 is not None]
        top = max((c.published.top1 for c in published), default=None)
        for c in published:
            c.best = c.published.top1 == top


# ---------------------------------------------------------------- text of cells and rows


def cell_text(cell: Cell) -> str:
    """``73.12 (MoCo)``, ``73.12 (MoCo) / 72.80 (-0.32)``, ``75.62 / 75.10 ± 0.26 (n=3) (-0.52)``, ``-``."""
    text = cell.published.text
    if cell.mean is None:
        return text
    reproduced = f"{cell.mean:.2f}" if cell.n == 1 else f"{cell.mean:.2f} ± {cell.std:.2f} (n={cell.n})"
    if cell.diff is not None:
        reproduced += f" ({cell.diff:+.2f})"
    return f"{text} / {reproduced}"


def row_head(rows: list[Row], i: int) -> list[str]:
    """Augmentation (first row of its group only), batch size, initial LR."""
    row = rows[i]
    first = i == 0 or rows[i - 1].aug != row.aug
    return [AUG_LABELS.get(row.aug, row.aug) if first else "", str(row.batch_size), f"{row.lr:g}"]


def cell_name(key: CellKey) -> str:
    return f"{presets.TABLES[key.table]} {key.row} {key.loss}"


def dataset_name(entry: Entry) -> str:
    table, _ = _table_of(entry)
    if table is not None:
        return presets.TABLES[table]
    classes = (entry.manifest.get("dataset") or {}).get("classes")
    return f"{classes} classes" if classes is not None else "unknown"


def loss_label(entry: Entry) -> str:
    if entry.config is None:
        return "-"
    return _loss_of(entry.config)[0] or "custom"


def other_row(entry: Entry, reasons: list[str]) -> list[str]:
    return [entry.label, dataset_name(entry), str(entry.manifest.get("preset") or "-"), loss_label(entry),
            entry.probe, _pct(entry.best_top1), _pct(entry.top5), "; ".join(reasons)]


def not_in_table_row(entry: Entry, key: CellKey, reasons: list[str], report: Report) -> list[str]:
    return [OFF, entry.label, entry.probe, cell_name(key), _pct(entry.best_top1),
            report.cell(key).published.text, "; ".join(reasons)]


def diagnostics_row(entry: Entry) -> list[str]:
    d = entry.diagnostics
    epochs = d.get("epochs_done")
    after = "-" if epochs is None else str(epochs)
    if entry.collapsed_epoch is not None:
        after += f" (collapsed at epoch {entry.collapsed_epoch})"
    return [entry.label, loss_label(entry), entry.probe, _pct(entry.best_top1), _metric(d.get("align_metric")),
            _metric(d.get("unif_metric")), _pct(number(d.get("knn_top1"))), after]


def _metric(value: Any) -> str:
    value = number(value)
    return "-" if value is None else f"{value:.4f}"


HEAD = ["Augmentation", "Batch Size", "Initial LR"]
DIAGNOSTICS_HEAD = ["Run", "Loss", "Probe", "Best top-1", "Align", "Uniform", "kNN top-1", "After epochs"]
DIAGNOSTICS_LEGEND = ("Each pretraining run's last alignment and uniformity metrics (lower is better) and kNN "
                      "top-1, from the eval records of its metrics.jsonl; - where it has none.")
NOT_IN_TABLE_HEAD = ["", "Run", "Probe", "Cell", "Best top-1", "Published", "Reasons"]
OTHER_HEAD = ["Run", "Dataset", "Preset", "Loss", "Probe", "Best top-1", "Top-5", "Why not a cell"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------- renderers


def render_markdown(report: Report) -> str:
    losses = list(presets.loss_columns())
    lines = [MARKDOWN_MARKER, "", "# Reference validation accuracy", "", legend()]
    for table, rows in report.tables.items():
        lines += ["", f"## {presets.TABLES[table]}", "", _md_row(HEAD + losses),
                  _md_row(["---"] * (len(HEAD) + len(losses)))]
        for i, row in enumerate(rows):
            cells = []
            for cell in row.cells:
                text = f"**{cell_text(cell)}**" if cell.best else cell_text(cell)
                cells.append(text + (f" {OFF}" if cell.off_protocol else ""))
            lines.append(_md_row(row_head(rows, i) + cells))
    if report.not_in_table:
        lines += ["", "## Not in the table", "",
                  "Runs of a table cell that differ from the published protocol, with every difference.", "",
                  _md_row(NOT_IN_TABLE_HEAD), _md_row(["---"] * len(NOT_IN_TABLE_HEAD))]
        lines += [_md_row(not_in_table_row(e, k, r, report)) for e, k, r in report.not_in_table]
    if report.other:
        lines += ["", "## Other runs", "", _md_row(OTHER_HEAD), _md_row(["---"] * len(OTHER_HEAD))]
        lines += [_md_row(other_row(e, r)) for e, r in report.other]
    if report.entries:
        lines += ["", "## Representation diagnostics", "", DIAGNOSTICS_LEGEND, "",
                  _md_row(DIAGNOSTICS_HEAD), _md_row(["---"] * len(DIAGNOSTICS_HEAD))]
        lines += [_md_row(diagnostics_row(e)) for e in report.entries]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render_rich(report: Report, console: Console) -> None:
    """The report in a terminal or a pipe. The tables are laid out as in the README where they fit
    the console; where they do not, each row of the table is a heading over one line per loss, and
    each run and probe of the diagnostics two lines, so no loss, run or number is cut. The runs that
    are not in the table are listed with one reason per line."""
    console.print(TITLE, markup=False, highlight=False)
    for table, rows in report.tables.items():
        console.print()
        wide = _cells_table(table, rows, console)
        console.print(wide if fits(console, wide) else _cells_by_row(table, rows, console))
    if report.not_in_table:
        console.print()
        console.print(Text("Not in the table: runs of a cell that differ from the published protocol",
                           style="italic"))
        for e, k, reasons in report.not_in_table:
            paragraph(console, f"{OFF} {e.label}, probe {e.probe}: top-1 {_pct(e.best_top1)}")
            paragraph(console, f"  in {cell_name(k)}, published {report.cell(k).published.text}")
            console.print(bullets(reasons, indent=2))
    if report.other:
        console.print()
        console.print(Text("Other runs: not a cell of the published tables", style="italic"))
        for e, reasons in report.other:
            paragraph(console, f"{e.label}, probe {e.probe}: top-1 {_pct(e.best_top1)}, top-5 {_pct(e.top5)}")
            paragraph(console, f"  dataset {dataset_name(e)}, preset {e.manifest.get('preset') or '-'}, "
                               f"loss {loss_label(e)}")
            console.print(bullets(reasons, indent=2))
    if report.entries:
        console.print()
        wide = _diagnostics_table(report)
        if fits(console, wide):
            console.print(wide)
        else:
            console.print(Text("Representation diagnostics", style="italic"))
            paragraph(console, DIAGNOSTICS_LEGEND)
            for e in report.entries:
                paragraph(console, f"{e.label} ({loss_label(e)}), probe {e.probe}: top-1 {_pct(e.best_top1)}")
                paragraph(console, "  " + _diagnostics_line(e))
    console.print()
    paragraph(console, legend(emphasis_name(console).capitalize()))
    for note in report.notes:
        paragraph(console, f"note: {note}")


def _cell(cell: Cell, console: Console) -> Text:
    text = emphasised(cell_text(cell), console) if cell.best else Text(cell_text(cell))
    return text + (f" {OFF}" if cell.off_protocol else "")


def _cells_table(table: str, rows: list[Row], console: Console) -> Table:
    """The README's layout: a row per (augmentation, batch, LR), a column per loss."""
    t = Table(title=presets.TABLES[table], title_justify="left")
    for name in HEAD:
        # the augmentation on two lines ("Strong Aug. + MLP" / "Head + Cosine LR") rather than a wider table
        t.add_column(name, no_wrap=name != "Augmentation", max_width=17 if name == "Augmentation" else None)
    for loss in presets.loss_columns():
        t.add_column(loss, justify="right", no_wrap=True)
    for i, row in enumerate(rows):
        t.add_row(*row_head(rows, i), *(_cell(c, console) for c in row.cells))
    return t


def _cells_by_row(table: str, rows: list[Row], console: Console) -> Group:
    """The same table for a narrow console: each row a heading, then one line per loss."""
    width = max(len(loss) for loss in presets.loss_columns())
    parts: list[RenderableType] = [Text(presets.TABLES[table], style="italic")]
    for row in rows:
        parts.append(Text(f"{AUG_LABELS.get(row.aug, row.aug)}, batch {row.batch_size}, LR {row.lr:g}"))
        lines = Table.grid(padding=(0, 2))
        lines.add_column(width=width, no_wrap=True)
        lines.add_column()
        for cell in row.cells:
            lines.add_row(cell.key.loss, _cell(cell, console))
        parts.append(Padding(lines, (0, 0, 0, 2), expand=False))
    return Group(*parts)


def _diagnostics_table(report: Report) -> Table:
    t = Table(title="Representation diagnostics", caption=DIAGNOSTICS_LEGEND, title_justify="left",
              caption_justify="left")
    for name in DIAGNOSTICS_HEAD:
        t.add_column(name, justify="left" if name in ("Run", "Loss", "Probe") else "right", no_wrap=True)
    for e in report.entries:
        t.add_row(*(Text(s) for s in diagnostics_row(e)))
    return t


def _diagnostics_line(entry: Entry) -> str:
    collapsed = "" if entry.collapsed_epoch is None else f"; collapsed at epoch {entry.collapsed_epoch}"
    if not entry.diagnostics:
        return "no eval records in its metrics.jsonl" + collapsed
    d = entry.diagnostics
    epochs = d.get("epochs_done")
    epochs_done = f"after {epochs} epoch" + ("" if epochs == 1 else "s")
    return (f"align {_metric(d.get('align_metric'))}, uniform {_metric(d.get('unif_metric'))}, "
            f"kNN top-1 {_pct(number(d.get('knn_top1')))}, {epochs_done}{collapsed}")


def render_rich_text(report: Report, width: int = 200) -> str:
    buffer = io.StringIO()
    render_rich(report, Console(file=buffer, width=width, color_system=None, force_terminal=False,
                                soft_wrap=True))
    return buffer.getvalue()


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def report_data(report: Report) -> dict[str, Any]:
    """The report as plain data (the json format; the csv format flattens it)."""

    def entry_data(e: Entry) -> dict[str, Any]:
        return {"run": e.label, "probe": e.probe, "best_top1": e.best_top1, "top5": e.top5,
                "results": shown_path(e.results_path),
                **{name: number(e.diagnostics.get(name)) for name in DIAGNOSTICS},
                "diagnostics_epoch": e.diagnostics.get("epochs_done"), "collapsed_epoch": e.collapsed_epoch}

    tables = []
    for table, rows in report.tables.items():
        tables.append({"table": table, "title": presets.TABLES[table], "rows": [{
            "row": row.name, "aug": row.aug, "augmentation": AUG_LABELS.get(row.aug, row.aug),
            "batch_size": row.batch_size, "lr": row.lr,
            "cells": [{
                "loss": c.key.loss, "published": c.published.top1, "spread": c.published.spread,
                "label": c.published.label,
                "reproduced_mean": _r(c.mean), "reproduced_std": _r(c.std), "n": c.n, "diff": _r(c.diff),
                "best": c.best, "text": cell_text(c), "entries": [entry_data(e) for e in c.entries],
                "not_in_table": len(c.off_protocol),
            } for c in row.cells],
        } for row in rows]})
    return {
        "format": REPORT_FORMAT,
        "tables": tables,
        "not_in_table": [{**entry_data(e), **k._asdict(), "published": report.cell(k).published.top1,
                          "reasons": r}
                         for e, k, r in report.not_in_table],
        "other_runs": [{**entry_data(e), "dataset": dataset_name(e), "preset": e.manifest.get("preset"),
                        "loss": loss_label(e), "reasons": r} for e, r in report.other],
        "notes": report.notes,
    }


def render_json(report: Report) -> str:
    return json.dumps(report_data(report), indent=2, ensure_ascii=False) + "\n"


class _CsvWriter(csv.DictWriter):
    def writerow(self, rowdict):  # booleans as in JSON: true / false
        return super().writerow({k: _show(v) if isinstance(v, bool) else v for k, v in rowdict.items()})


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = _CsvWriter(buffer, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    data = report_data(report)
    for table in data["tables"]:
        for row in table["rows"]:
            for c in row["cells"]:
                base = {"table": table["table"], "row": row["row"], "loss": c["loss"], "published": c["published"],
                        "label": c["label"]}
                writer.writerow({"kind": "cell", **base, **{k: c[k] for k in (
                    "reproduced_mean", "reproduced_std", "n", "diff")}, "best": c["best"]})
                for e in c["entries"]:
                    writer.writerow({"kind": "entry", **base, "run": e["run"], "probe": e["probe"],
                                     "best_top1": e["best_top1"], "top5": e["top5"],
                                     **{k: e[k] for k in RUN_DIAGNOSTICS}})
    for e in data["not_in_table"]:
        writer.writerow({"kind": "not-in-table", **{k: e[k] for k in ("table", "row", "loss", "published", "run",
                                                                        "probe", "best_top1", "top5", *RUN_DIAGNOSTICS)},
                         "reasons": "; ".join(e["reasons"])})
    for e in data["other_runs"]:
        writer.writerow({"kind": "other", "loss": e["loss"], "run": e["run"], "probe": e["probe"],
                         "best_top1": e["best_top1"], "top5": e["top5"], "reasons": "; ".join(e["reasons"]),
                         **{k: e[k] for k in RUN_DIAGNOSTICS}})
    return buffer.getvalue()


def write_plot(report: Report, path: Path) -> None:
    fig = plot_figure(report)
    with files.replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": TITLE})


NO_CELL_NOTE = ("No run reproduces a cell of the published tables yet (they need ImageNet-100 or ImageNet "
                "pretraining), so there is no reproduced-vs-published panel.")
# Both metrics of unit vectors span a few units (alignment in [0, 4], uniformity about [-4, 0]): a frame
# narrower than this would blow one run's point up into a window of rounding noise.
MIN_METRIC_SPAN = 0.2


def plot_figure(report: Report) -> Any:
    """The paper's uniformity-alignment scatter, one point per run, and on its left the reproduced vs
    published top-1 of each table cell once a run reproduces one (before, it would be an empty diagonal)."""
    Figure, FigureCanvasAgg = _matplotlib()
    reproduced = [c for c in report.cells() if c.mean is not None and c.published.top1 is not None]
    fig = Figure(figsize=(14, 7) if reproduced else (8, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if reproduced:
        left, right = fig.subplots(1, 2)
        _plot_cells(reproduced, left)
    else:
        right = fig.subplots()
        fig.suptitle(NO_CELL_NOTE, fontsize=9, wrap=True)
    _plot_align_unif(report, fig, right)
    return fig


def _plot_align_unif(report: Report, fig: Any, ax: Any) -> None:
    """Uniformity (x) vs alignment (y), one point per run, coloured by its linear top-1 (Wang & Isola, Fig. 5)."""
    points = _one_entry_per_run([e for e in report.entries
                                 if number(e.diagnostics.get("align_metric")) is not None
                                 and number(e.diagnostics.get("unif_metric")) is not None])
    ax.set(xlabel="uniformity metric  log E exp(-2 ||f(x) - f(y)||²)  (lower is better)",
           ylabel="alignment metric  E ||f(x) - f(x+)||²  (lower is better)",
           title="Alignment and uniformity of each run (colour: linear top-1)")
    if not points:
        ax.text(0.5, 0.5, "no runs with diagnostics yet\n(eval records in metrics.jsonl)", transform=ax.transAxes,
                ha="center", va="center")
        return
    x = [e.diagnostics["unif_metric"] for e in points]
    y = [e.diagnostics["align_metric"] for e in points]
    top1 = [e.best_top1 if e.best_top1 is not None else math.nan for e in points]
    dots = ax.scatter(x, y, c=top1, cmap="viridis", s=60, edgecolors="0.2", plotnonfinite=True)
    fig.colorbar(dots, ax=ax, label="linear top-1 (%)")
    for e, xi, yi in zip(points, x, y):
        ax.annotate(e.label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlim=_frame(x, MIN_METRIC_SPAN), ylim=_frame(y, MIN_METRIC_SPAN))


def _frame(values: list[float], min_span: float) -> tuple[float, float]:
    """Axis limits around ``values`` with 15% margins each side, and at least ``min_span`` wide."""
    low, high = min(values), max(values)
    half = max((high - low) * 1.3, min_span) / 2
    middle = (low + high) / 2
    return middle - half, middle + half


def _one_entry_per_run(entries: list[Entry]) -> list[Entry]:
    """A run probed several times is one point: its best per-epoch (published-protocol) probe, else its best."""
    def rank(e: Entry) -> tuple[bool, float]:
        per_epoch = (e.results.get("protocol") or {}).get("kind") == "per-epoch"
        return per_epoch, e.best_top1 if e.best_top1 is not None else -math.inf

    best: dict[str, Entry] = {}
    for e in entries:
        if e.label not in best or rank(e) > rank(best[e.label]):
            best[e.label] = e
    return list(best.values())


def _plot_cells(points: list[Cell], ax: Any) -> None:
    """Reproduced (mean ± std over seeds) vs published top-1, one point per reproduced cell."""
    values = [v for c in points for v in (c.published.top1, c.mean)]
    low, high = math.floor(min(values)) - 1, math.ceil(max(values)) + 1
    ax.plot([low, high], [low, high], color="0.6", linestyle="--", linewidth=1, label="reproduced = published")
    for table, marker in zip(presets.TABLES, "os"):
        mine = [c for c in points if c.key.table == table]
        if mine:
            ax.errorbar([c.published.top1 for c in mine], [c.mean for c in mine],
                        yerr=[c.std or 0.0 for c in mine], fmt=marker, capsize=3, label=presets.TABLES[table])
        for c in mine:
            ax.annotate(f"{c.key.row}×{c.key.loss}", (c.published.top1, c.mean), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set(xlim=(low, high), ylim=(low, high), xlabel="published top-1 (%)", ylabel="reproduced top-1 (%)",
           title="Linear top-1: reproduced vs published")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         hint="pip install 'mauctl[plot]'") from None
    return Figure, FigureCanvasAgg


# ---------------------------------------------------------------- files and the command


def written_by_report(path: Path) -> bool:
    """Whether ``path`` holds a file an earlier `mauctl report` wrote (the only files it replaces)."""
    try:
        with path.open("rb") as f:
            head = f.read(65536)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return TITLE.encode() in head
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    if first in (MARKDOWN_MARKER, TITLE, ",".join(CSV_FIELDS), ",".join(CSV_FIELDS_1)):
        return True
    if first == "{" and path.stat().st_size < 64 * 2**20:
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return False
    return False


def run_report(paths: Sequence[Path], *, fmt: str = "rich", out_file: Path | None = None,
               plot: Path | None = None, console: Console | None = None,
               err_console: Console | None = None) -> Report:
    """What `mauctl report` does: check the arguments, collect, match, render, write."""
    console = console or Console()
    err_console = err_console or Console(stderr=True)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of " + ", ".join(FORMATS))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UsageError("no such run directory or folder: " + ", ".join(missing),
                         hint="Give run directories or folders that hold them (default: runs/).")
    for target, option in ((out_file, "--out"), (plot, "--plot")):
        if target is not None:
            files.check_new_file(target, option, ours=written_by_report)
    if out_file is not None and plot is not None and os.path.abspath(out_file) == os.path.abspath(plot):
        raise UsageError("--out and --plot name the same file")
    if plot is not None:
        _matplotlib()
    notes: list[str] = []
    if paths:
        entries = collect(paths, notes)
    elif Path("runs").is_dir():
        entries = collect([Path("runs")], notes)
    else:
        entries = []
        notes.append(f"no runs/ folder in {Path.cwd()}; give run directories or folders to scan.")
    report = build_tables(entries, notes)

    if out_file is not None:
        text = {"rich": render_rich_text, "markdown": render_markdown, "csv": render_csv,
                "json": render_json}[fmt](report)
        files.write_text_atomically(out_file, text)
        err_console.print(f"report written to {out_file}", markup=False, highlight=False)
    elif fmt == "rich":
        render_rich(report, console)
    else:
        text = {"markdown": render_markdown, "csv": render_csv, "json": render_json}[fmt](report)
        console.file.write(text)
        console.file.flush()
        if fmt == "csv":
            for note in report.notes:
                err_console.print(f"note: {note}", markup=False, highlight=False)
    if plot is not None:
        write_plot(report, plot)
        err_console.print(f"plot written to {plot}", markup=False, highlight=False)
    return report
