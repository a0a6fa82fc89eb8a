"""Preset files, loss columns and the published reference table.

A preset is a TOML config file under ``presets/`` (installed as ``mauctl/presets``) with an
optional ``[preset]`` table: ``command`` (pretrain or lincls), ``description`` and, for the
rows of the published table, ``reference = "<table>:<row>"``. The loss columns and the
published top-1 of each cell come from ``mauctl/resources/reference_table.toml``, a copy of
the table in the moco_align_uniform README.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from mauctl.errors import UsageError, did_you_mean

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_LOSS = "align3-unif3"
TABLES = {"imagenet100": "ImageNet-100", "imagenet": "ImageNet"}
PRESET_KEYS = {"command", "description", "reference"}


def preset_dir() -> Path:
    """``mauctl/presets`` in an installed wheel, the repository's ``presets/`` in a source checkout."""
    installed = PACKAGE_DIR / "presets"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "presets"


def resource_text(name: str) -> str:
    return resources.files("mauctl").joinpath("resources", name).read_text(encoding="utf-8")


@cache
def reference_table() -> dict[str, Any]:
    table = tomllib.loads(resource_text("reference_table.toml"))
    # The column names contain dots ("contr-t0.07"), which bare TOML keys read as nesting.
    table["columns"] = _rejoin(table["columns"], leaf_is_table=True)
    for dataset in TABLES:
        for row in table[dataset]:
            for key in ("top1", "label", "spread"):
                if key in row:
                    row[key] = _rejoin(row[key])
    return table


def _rejoin(nested: dict[str, Any], leaf_is_table: bool = False, prefix: str = "") -> dict[str, Any]:
    """Undo TOML's dotted-key nesting: {"contr-t0": {"07": v}} -> {"contr-t0.07": v}."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = prefix + key
        is_leaf = not isinstance(value, dict) or (
            leaf_is_table and not any(isinstance(v, dict) for v in value.values())
        )
        if is_leaf:
            flat[name] = value
        else:
            flat.update(_rejoin(value, leaf_is_table, name + "."))
    return flat


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
class Cell:
    dataset: str
    preset: str
    loss: str
    top1: float | None
    label: str | None = None
    best: bool = False
    spread: float | None = None


def cells() -> list[Cell]:
    """Every (preset, loss column) of the published tables, with its top-1 where one was published."""
    table = reference_table()
    rows = {}
    for preset in all_presets():
        if preset.reference:
            rows[preset.reference] = preset.name
    out = []
    for dataset in TABLES:
        for row in table[dataset]:
            preset = rows.get((dataset, row["row"]))
            if preset is None:
                continue
            for loss in loss_columns():
                out.append(Cell(
                    dataset=dataset,
                    preset=preset,
                    loss=loss,
                    top1=row["top1"].get(loss),
                    label=row.get("label", {}).get(loss),
                    best=row.get("best") == loss,
                    spread=row.get("spread", {}).get(loss),
                ))
    return out
