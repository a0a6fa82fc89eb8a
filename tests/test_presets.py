"""Presets are the rows of the published table, `--loss` its columns; `mauctl presets` lists them.

The expected numbers come from the spec's copy of the table, parsed here independently of
``mauctl.presets``, plus a few literal cells in case the spec copy is not at hand.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import run_mauctl
from mauctl import cli, presets
from mauctl.cli import app
from mauctl.compat import tomllib
from mauctl.config import LinclsConfig, PretrainConfig, load_config, loss_name

REPO = Path(__file__).resolve().parent.parent
SPEC_TABLE = Path("/work/shared/spec/reference_table.toml")
ALL_PRESETS = ["demo", "in1k-v2-b256", "lincls", "lincls-demo", "lincls-in1k", "v1-b128", "v1-b256", "v1-b256-lr0.06",
               "v2-b128", "v2-b256", "v2-b256-lr0.06"]
LOSSES = ["contr-t0.07", "contr-t0.2", "align2-unif2", "align3-unif3", "align4-unif4"]
PRESET_OF_ROW = {("imagenet100", row): row for row in
                 ["v1-b128", "v1-b256", "v1-b256-lr0.06", "v2-b128", "v2-b256", "v2-b256-lr0.06"]}
PRESET_OF_ROW[("imagenet", "v2-b256")] = "in1k-v2-b256"


def unnest(table: dict, leaf=lambda value: not isinstance(value, dict)) -> dict:
    """tomllib reads the bare key ``contr-t0.07`` as {"contr-t0": {"07": ...}}; join such paths back."""
    joined = {}
    for key, value in table.items():
        if leaf(value):
            joined[key] = value
            continue
        for inner_key, inner_value in unnest(value, leaf).items():
            joined[f"{key}.{inner_key}"] = inner_value
    return joined


def is_column(value) -> bool:
    return isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values())


@pytest.fixture(scope="module")
def spec() -> dict:
    if not SPEC_TABLE.is_file():
        pytest.skip(f"the spec's reference table is not at {SPEC_TABLE}")
    raw = tomllib.loads(SPEC_TABLE.read_text(encoding="utf-8"))
    table = {"columns": unnest(raw["columns"], is_column), "rows": []}
    for dataset in ("imagenet100", "imagenet"):
        for row in raw[dataset]:
            flat_row = dict(row, dataset=dataset)
            for key in ("top1", "label", "spread"):
                flat_row[key] = unnest(row.get(key, {}))
            table["rows"].append(flat_row)
    return table


def load(**kwargs) -> PretrainConfig:
    return load_config("pretrain", environ={}, **kwargs).config


def presets_json() -> list[dict]:
    result = CliRunner().invoke(app, ["presets", "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------- the spec parser itself


def test_spec_table_unnesting_keeps_dotted_column_names(spec):
    assert list(spec["columns"]) == LOSSES
    v1_b128 = spec["rows"][0]
    assert v1_b128["top1"]["contr-t0.07"] == 73.12 and v1_b128["top1"]["align3-unif3"] == 75.62
    assert len(spec["rows"]) == 7


# ---------------------------------------------------------------- `mauctl presets`


def presets_text(width: int, terminal: bool = False) -> str:
    """What `mauctl presets` prints at ``width`` columns: into a pipe, or into a colour terminal."""
    buffer = io.StringIO()
    presets.render_presets(Console(file=buffer, width=width, soft_wrap=True, force_terminal=terminal,
                                   color_system="standard" if terminal else None))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def test_presets_lists_every_preset_and_every_loss_column(monkeypatch):
    monkeypatch.setattr(cli, "out", Console(width=250, soft_wrap=True))
    result = CliRunner().invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    for name in ALL_PRESETS + LOSSES:
        assert name in result.stdout, name
    assert "Default --loss: align3-unif3." in result.stdout


def test_presets_at_80_columns_or_in_a_pipe_turns_the_table_on_its_side_and_cuts_nothing(tmp_path):
    result = run_mauctl("presets", cwd=tmp_path, COLUMNS="80")  # stdout is a pipe, as with `| cat`
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    # a row per loss, a column per preset, the six ImageNet-100 presets over two tables
    assert """\
┃ loss         ┃         v2-b128 ┃         v2-b256 ┃  v2-b256-lr0.06 ┃
┡━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━┩
│ contr-t0.07  │           73.92 │           69.64 │           73.36 │
│ contr-t0.2   │ 77.54 (MoCo v2) │ 67.52 (MoCo v2) │ 76.32 (MoCo v2) │
│ align2-unif2 │            77.4 │           66.92 │            75.5 │
│ align3-unif3 │       **77.66** │           67.44 │           75.74 │
│ align4-unif4 │            76.7 │           71.42 │           73.84 │
""" in text
    assert "┃ loss         ┃      v1-b128 ┃      v1-b256 ┃ v1-b256-lr0.06 ┃" in text
    assert "│ contr-t0.2   │ 67.5 ± 0.1 (MoCo v2) │" in text
    for name in ALL_PRESETS:
        assert f"│ {name} " in text or f" {name} ┃" in text, name
    assert "**bold**: the best of its row" in text


@pytest.mark.parametrize("width", [100, 200])
def test_presets_where_it_fits_is_the_readme_table(width):
    text = presets_text(width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    assert "┃ preset         ┃  contr-t0.07 ┃      contr-t0.2 ┃ align2-unif2 ┃ align3-unif3 ┃ align4-unif4 ┃\n" \
        in text
    assert "│ v2-b128        │        73.92 │ 77.54 (MoCo v2) │         77.4 │    **77.66** │         76.7 │\n" \
        in text
    assert "│ in1k-v2-b256 │           - │ 67.5 ± 0.1 (MoCo v2) │            - │   **67.694** │            - │\n" \
        in text


def test_presets_in_a_terminal_marks_the_best_of_a_row_bold():
    text = presets_text(100, terminal=True)
    assert re.search(r"\x1b\[1m *77\.66\x1b\[0m", text)  # bold, right-justified in its column
    assert "**" not in text and "bold: the best of its row" in text


def test_every_preset_is_described_with_the_row_it_reproduces():
    text = " ".join(presets_text(200).split())  # descriptions may wrap; compare word by word
    for preset in presets.all_presets():
        assert preset.description in text, preset.name
    assert "Row v2-b256 of the ImageNet table." in text
    assert "Row v1-b256-lr0.06 of the ImageNet-100 table." in text


def test_presets_json_lists_every_preset():
    assert {row["preset"] for row in presets_json()} == set(ALL_PRESETS)


def test_presets_json_has_the_published_imagenet100_cells(spec):
    expected = {(PRESET_OF_ROW[("imagenet100", row["row"])], loss): top1
                for row in spec["rows"] if row["dataset"] == "imagenet100"
                for loss, top1 in row["top1"].items()}
    cells = {(c["preset"], c["loss"]): c["top1"] for c in presets_json() if c["dataset"] == "imagenet100"}
    assert len(expected) == 30
    assert cells == expected


def test_presets_json_has_the_published_imagenet_cells(spec):
    (row,) = [r for r in spec["rows"] if r["dataset"] == "imagenet"]
    cells = {c["loss"]: c for c in presets_json() if c["dataset"] == "imagenet"}
    assert {loss for loss, c in cells.items() if c["top1"] is not None} == set(row["top1"]) == \
        {"contr-t0.2", "align3-unif3"}
    for loss, top1 in row["top1"].items():
        assert cells[loss]["preset"] == "in1k-v2-b256" and cells[loss]["top1"] == top1
    assert cells["contr-t0.2"]["spread"] == row["spread"]["contr-t0.2"] == 0.1
    assert set(cells) == set(LOSSES)  # the unpublished columns are there too, with top1 null


def test_presets_json_marks_labels_and_the_best_cell(spec):
    cells = {(c["dataset"], c["preset"], c["loss"]): c for c in presets_json() if c["dataset"]}
    for row in spec["rows"]:
        preset = PRESET_OF_ROW[(row["dataset"], row["row"])]
        for loss in LOSSES:
            cell = cells[(row["dataset"], preset, loss)]
            assert cell["label"] == row["label"].get(loss)
            assert cell["best"] == (row.get("best") == loss)


def test_a_few_published_numbers_literally():
    cells = {(c["dataset"], c["preset"], c["loss"]): c["top1"] for c in presets_json() if c["dataset"]}
    assert cells[("imagenet100", "v1-b128", "align3-unif3")] == 75.62
    assert cells[("imagenet100", "v2-b256", "align4-unif4")] == 71.42
    assert cells[("imagenet100", "v2-b256-lr0.06", "contr-t0.2")] == 76.32
    assert cells[("imagenet", "in1k-v2-b256", "align3-unif3")] == 67.694
    assert cells[("imagenet", "in1k-v2-b256", "align2-unif2")] is None


# ---------------------------------------------------------------- the presets themselves


def test_each_table_preset_matches_its_reference_row(spec):
    for row in spec["rows"]:
        name = PRESET_OF_ROW[(row["dataset"], row["row"])]
        assert presets.load_preset(name).reference == (row["dataset"], row["row"])
        c = load(preset=name)
        assert (c.data.aug, c.optim.batch_size, c.optim.lr) == \
            (row["aug"], row["batch_size"], row["lr"]), name
        if row["aug"] == "v1":
            assert (c.model.mlp, c.optim.cos, c.optim.schedule) == (False, False, [120, 160]), name
        else:
            assert (c.model.mlp, c.optim.cos) == (True, True), name
        assert (c.model.arch, c.model.dim, c.model.queue_size, c.model.key_momentum) == \
            ("resnet50", 128, 65536, 0.999), name
        assert (c.optim.epochs, c.optim.momentum, c.optim.weight_decay) == (200, 0.9, 1e-4), name
        assert loss_name(c.loss) == "align3-unif3"


def test_defaults_match_the_original_scripts():
    c = PretrainConfig()
    assert (c.model.arch, c.model.dim, c.model.queue_size, c.model.key_momentum, c.model.mlp) == \
        ("resnet50", 128, 65536, 0.999, False)
    assert (c.optim.lr, c.optim.batch_size, c.optim.epochs, c.optim.schedule, c.optim.cos) == \
        (0.03, 256, 200, [120, 160], False)
    assert (c.optim.momentum, c.optim.weight_decay) == (0.9, 1e-4)
    assert (c.data.image_size, c.data.aug, c.loss.intra_batch) == (224, "v1", True)


def test_loss_columns_set_exactly_the_published_weights(spec):
    for column, values in spec["columns"].items():
        loss = load(preset="v2-b256", loss=column).loss
        for key, value in values.items():
            assert getattr(loss, key) == value, (column, key)
        assert loss.intra_batch is True
    assert presets.loss_columns() == spec["columns"]


def test_default_loss_is_the_align3_unif3_column(spec):
    column = spec["columns"]["align3-unif3"]
    assert load().loss.model_dump(include=set(column)) == column


@pytest.mark.parametrize("name", ["lincls", None])
def test_linear_probe_protocol(name):
    c = load_config("lincls", preset=name, environ={}).config
    assert isinstance(c, LinclsConfig)
    o = c.optim
    assert (o.lr, o.batch_size, o.epochs, o.schedule, o.weight_decay, o.momentum, o.cos) == \
        (30.0, 256, 100, [60, 80], 0.0, 0.9, False)


def test_lincls_in1k_is_the_same_protocol():
    assert load_config("lincls", preset="lincls-in1k", environ={}).config.optim == \
        load_config("lincls", preset="lincls", environ={}).config.optim


def test_demo_preset_runs_without_data_on_a_small_model():
    c = load(preset="demo")
    assert (c.data.builtin, c.model.arch, c.model.small_stem) == ("digits", "resnet18", True)
    assert c.model.queue_size % c.optim.batch_size == 0


# ---------------------------------------------------------------- files on disk and in the wheel


def test_preset_dir_is_the_checkout_presets_folder():
    assert presets.preset_dir() == REPO / "presets"
    assert presets.preset_names() == ALL_PRESETS
    assert sorted(p.stem for p in (REPO / "presets").glob("*.toml")) == ALL_PRESETS


def test_bundled_reference_table_is_the_spec_table():
    if not SPEC_TABLE.is_file():
        pytest.skip(f"the spec's reference table is not at {SPEC_TABLE}")
    bundled = REPO / "mauctl" / "resources" / "reference_table.toml"
    assert tomllib.loads(bundled.read_text(encoding="utf-8")) == \
        tomllib.loads(SPEC_TABLE.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_wheel_ships_presets_and_resources(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("mauctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mauctl/presets/{name}.toml" for name in ALL_PRESETS} <= names
    assert {"mauctl/resources/imagenet100_classes.txt", "mauctl/resources/reference_table.toml"} <= names
    assert not any(name.startswith(("presets/", "tests/")) for name in names)
