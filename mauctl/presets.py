"""Preset files, loss columns and the published reference table.

A preset is a TOML config file under ``presets/`` (installed as ``mauctl/presets``) with an
optional ``[preset]`` table: ``command`` (pretrain or lincls), ``description`` and, for the
rows of the published table, ``reference = "<table>:<row>"``. The loss columns and the
published top-1 of each cell (a ``PublishedCell``) come from
``mauctl/resources/reference_table.toml``, a copy of the table in the moco_align_uniform README.
`mauctl presets` prints them (``render_presets``, ``presets_data``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mauctl.compat import tomllib
from mauctl.errors import UsageError, did_you_mean
from mauctl.terminal import emphasis_name, emphasised, fits, paragraph

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_LOSS = "align3-unif3"
TABLES = {"imagenet100": "ImageNet-100", "imagenet": "ImageNet"}
PRESET_KEYS = {"command", "description", "reference"}


def preset_dir() -> Path:
    """``mauctl/presets`` in an installed wheel, the repository's ``presets/`` in a source checkout."""
    installed = PACKAGE_DIR / "presets"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "presets"


def resource_text(name: str) -> str:
    # one name per step: before 3.11, a Traversable's joinpath takes one name
    return (resources.files("mauctl") / "resources" / name).read_text(encoding="utf-8")


@cache
def reference_table() -> dict[str, Any]:
    """The published table (its loss names are quoted TOML keys: "contr-t0.07" holds a dot)."""
    return tomllib.loads(resource_text("reference_table.toml"))


def loss_columns() -> dict[str, dict[str, float]]:
    """Loss column name -> the loss.* values it sets (from the reference table)."""
    return reference_table()["columns"]


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    command: str  # "pretrain" or "lincls"
    description: str
    reference: tuple[str, str] | None  # (table, row) of the published table
    values: dict[str, Any]  # the config sections, without [preset]


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def load_preset(name: str) -> Preset:
    path = preset_dir() / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown preset '{name}' ({did_you_mean(name, preset_names())})",
                         hint="`mauctl presets` lists them.")
    return preset_from_toml(tomllib.loads(path.read_text(encoding="utf-8")), path, name)


def preset_from_toml(data: dict[str, Any], path: Path, name: str | None = None) -> Preset:
    """Split a preset or user config file into its ``[preset]`` metadata and its config sections."""
    meta = data.pop("preset", {})
    unknown = set(meta) - PRESET_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise UsageError(f"{path}: unknown key 'preset.{key}' ({did_you_mean(key, PRESET_KEYS)})")
    command = meta.get("command", "pretrain")
    if command not in ("pretrain", "lincls"):
        raise UsageError(f"{path}: preset.command = {command!r}: expected 'pretrain' or 'lincls'")
    reference = None
    if "reference" in meta:
        table, _, row = str(meta["reference"]).partition(":")
        if table not in TABLES or not any(r["row"] == row for r in reference_table()[table]):
            raise UsageError(f"{path}: preset.reference = {meta['reference']!r} is not a row of the table")
        reference = (table, row)
    return Preset(name or path.stem, path, command, meta.get("description", ""), reference, data)


def all_presets() -> list[Preset]:
    return [load_preset(name) for name in preset_names()]


def loss_values(name: str) -> dict[str, float]:
    columns = loss_columns()
    if name not in columns:
        raise UsageError(f"unknown loss '{name}' ({did_you_mean(name, columns)})",
                         hint="Loss columns: " + ", ".join(columns) + ".")
    return dict(columns[name])


@dataclass(frozen=True)
class PublishedCell:
    """A cell of the published table: a row (the protocol a preset reproduces) and a loss column."""

    table: str  # "imagenet100" or "imagenet"
    row: str  # e.g. "v2-b256"
    loss: str  # e.g. "align3-unif3"
    top1: float | None  # None where the README publishes no number
    spread: float | None = None  # the ± the README gives, where it gives one
    label: str | None = None  # the method the README names in this cell, e.g. "MoCo v2"
    best: bool = False  # the README marks it the best of its row
    preset: str | None = None  # the preset whose reference is this row

    @property
    def text(self) -> str:
        """``73.12 (MoCo)``, ``67.5 ± 0.1 (MoCo v2)``, ``-`` where nothing was published."""
        if self.top1 is None:
            return "-"
        text = f"{self.top1:g}" + (f" ± {self.spread:g}" if self.spread else "")
        return text + (f" ({self.label})" if self.label else "")


def published_cells() -> list[PublishedCell]:
    """Every (row, loss column) of the published tables, table by table and row by row."""
    table = reference_table()
    preset_of_row = {p.reference: p.name for p in all_presets() if p.reference}
    return [
        PublishedCell(
            table=dataset,
            row=row["row"],
            loss=loss,
            top1=row["top1"].get(loss),
            spread=row.get("spread", {}).get(loss),
            label=row.get("label", {}).get(loss),
            best=row.get("best") == loss,
            preset=preset_of_row.get((dataset, row["row"])),
        )
        for dataset in TABLES
        for row in table[dataset]
        for loss in loss_columns()
    ]


# ---------------------------------------------------------------- `mauctl presets`


def presets_data() -> list[dict[str, Any]]:
    """`mauctl presets --format json`: every published cell of a preset's row, then the other presets."""
    rows: list[dict[str, Any]] = [
        {"dataset": c.table, "preset": c.preset, "loss": c.loss, "top1": c.top1, "label": c.label,
         "best": c.best, "spread": c.spread}
        for c in published_cells() if c.preset is not None
    ]
    rows += [
        {"dataset": None, "preset": p.name, "loss": None, "top1": None, "command": p.command,
         "description": p.description}
        for p in all_presets() if p.reference is None
    ]
    return rows


def render_presets(console: Console) -> None:
    """The published top-1 of each preset's row and loss column, then every preset with its description.

    The table is the README's (presets as rows, losses as columns) where it fits the console, else
    turned on its side and split across as many tables as it takes, so no loss name is cut.
    """
    cells = published_cells()
    for table, title in TABLES.items():
        mine = [c for c in cells if c.table == table and c.preset is not None]
        heading = f"{title}: published linear top-1 (%) per"
        wide = _presets_by_loss(mine, console, f"{heading} --preset (row) and --loss (column)")
        if fits(console, wide):
            console.print(wide)
        else:
            turned_title = f"{heading} --loss (row) and --preset (column)"
            for turned in _losses_by_preset_that_fit(mine, console, turned_title):
                console.print(turned)
    console.print(_preset_descriptions())
    paragraph(console, f"Default --loss: {DEFAULT_LOSS}. {emphasis_name(console)}: the best of its row, as "
                       "the README marks it; (name): the method the README names; -: not published. "
                       "Use: mauctl pretrain DATA --preset PRESET --loss LOSS")


def _cell(cell: PublishedCell, console: Console) -> Text:
    return emphasised(cell.text, console) if cell.best else Text(cell.text)


def _presets_by_loss(cells: list[PublishedCell], console: Console, title: str) -> Table:
    """The README's layout: one row per preset, one column per loss."""
    table = Table(title=title, title_justify="left")
    table.add_column("preset", style="bold cyan", no_wrap=True)
    for loss in loss_columns():
        table.add_column(loss, justify="right", no_wrap=True)
    for preset in dict.fromkeys(c.preset for c in cells):
        table.add_row(preset, *(_cell(c, console) for c in cells if c.preset == preset))
    return table


def _losses_by_preset(cells: list[PublishedCell], names: list[str], console: Console,
                      title: str | None) -> Table:
    """The same table turned on its side: one row per loss, one column per preset in ``names``."""
    table = Table(title=title, title_justify="left")
    table.add_column("loss", style="bold cyan", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for loss in loss_columns():
        table.add_row(loss, *(_cell(c, console) for c in cells if c.loss == loss and c.preset in names))
    return table


def _losses_by_preset_that_fit(cells: list[PublishedCell], console: Console, title: str) -> list[Table]:
    """The turned table split, in order, into as few tables as fit the console; the title over the first."""
    chunks: list[list[str]] = []
    for preset in dict.fromkeys(c.preset for c in cells):
        if chunks and fits(console, _losses_by_preset(cells, chunks[-1] + [preset], console, None)):
            chunks[-1].append(preset)
        else:
            chunks.append([preset])  # alone, even where it does not fit: nothing narrower exists
    return [_losses_by_preset(cells, chunk, console, None if i else title) for i, chunk in enumerate(chunks)]


def _preset_descriptions() -> Table:
    table = Table(title="All presets (--preset NAME)", title_justify="left")
    table.add_column("preset", style="bold cyan", no_wrap=True)
    table.add_column("command", no_wrap=True)
    table.add_column("description")
    for preset in all_presets():
        description = preset.description
        if preset.reference:
            dataset, row = preset.reference
            description += f" Row {row} of the {TABLES[dataset]} table."
        table.add_row(preset.name, preset.command, description)
    return table
