"""`mauctl report`: the published table with the user's runs beside it.

Each test fabricates run directories the way the trainer and the linear probe leave them
(config.toml, manifest.json, status.json, lincls/<name>/results.json), runs the command and
reads what came out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import run_mauctl
from rich.console import Console

from mauctl import presets
from mauctl.cli import app
from mauctl.compat import tomllib
from mauctl.config import PretrainConfig, load_config, to_toml
from mauctl.report import run_report

IN100_DIGEST = hashlib.sha256(
    ("\n".join(sorted(presets.resource_text("imagenet100_classes.txt").split())) + "\n").encode()
).hexdigest()
IN1K_DIGEST = hashlib.sha256(b"the 1000 ImageNet classes\n").hexdigest()
DIGITS_DIGEST = hashlib.sha256(("\n".join(str(d) for d in range(10)) + "\n").encode()).hexdigest()
DATASETS = {
    "imagenet100": {"classes": 100, "images": 126689, "class_list_sha256": IN100_DIGEST},
    "imagenet": {"classes": 1000, "images": 1281167, "class_list_sha256": IN1K_DIGEST},
    "digits": {"classes": 10, "images": 1437, "class_list_sha256": DIGITS_DIGEST},
}
PROBE = {"kind": "per-epoch", "epochs": 100, "lr": 30.0, "batch_size": 256, "schedule": [60, 80], "cos": False,
         "momentum": 0.9, "weight_decay": 0.0, "image_size": 224}


@cache
def pretrain_config(preset: str, loss: str, sets: tuple[str, ...] = ()) -> str:
    return json.dumps(load_config("pretrain", preset=preset, loss=loss, sets=sets, environ={}).config.model_dump())


@cache
def lincls_config_toml() -> str:
    return to_toml(load_config("lincls", preset="lincls", environ={}).config)


def make_run(root: Path, name: str, *, preset: str, loss: str, sets: tuple[str, ...] = (),
             dataset: str = "imagenet100", state: str = "finished") -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = json.loads(pretrain_config(preset, loss, sets))
    (run / "config.toml").write_text(to_toml(PretrainConfig.model_validate(config)), encoding="utf-8")
    manifest = {"preset": preset, "loss": loss, "world_size": 8, "global_batch": config["optim"]["batch_size"],
                "dataset": {"root": f"/data/{dataset}", "split": "train", **DATASETS[dataset]}}
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (run / "status.json").write_text(json.dumps({"state": state, "epoch": config["optim"]["epochs"]}),
                                     encoding="utf-8")
    return run


def add_probe(run: Path, best_top1: float, *, name: str = "lincls", top5: float = 90.0, finished: bool = True,
              epochs_done: int = 100, **protocol) -> Path:
    config = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    dataset = json.loads((run / "manifest.json").read_text())["dataset"]
    results = {
        "format": "mauctl.lincls-results/1", "name": name, "finished": finished,
        "top1": best_top1 - 0.3, "top5": top5, "best_top1": best_top1, "best_epoch": epochs_done - 3,
        "epochs_done": epochs_done, "wall_time_s": 3600.0,
        "protocol": {**PROBE, **protocol, "dataset": {"root": dataset["root"], "classes": dataset["classes"],
                                                      "train_images": dataset["images"], "val_images": 5000,
                                                      "class_list_sha256": dataset["class_list_sha256"]}},
        "pretrain": {"source": "mauctl", "path": str(run / "checkpoints" / "last.pt"), "run_dir": str(run),
                     "arch": config["model"]["arch"], "epoch": config["optim"]["epochs"], "config_digest": None,
                     "config": config},
        "history": [{"epoch": e, "top1": best_top1 - 1, "top5": top5, "train_loss": 1.0} for e in (1, 2)],
    }
    return write_probe_folder(run / "lincls" / name, results)


def write_probe_folder(folder: Path, results: dict) -> Path:
    """What `mauctl lincls` leaves in its output folder: its own config, manifest and status, and the results."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(lincls_config_toml())
    (folder / "manifest.json").write_text(json.dumps({"command": "lincls", "preset": "lincls", "loss": None}))
    (folder / "status.json").write_text(json.dumps({"state": "finished" if results["finished"] else "stopped"}))
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder / "results.json"


def add_evals(run: Path, *evals: tuple[float, float, float | None]) -> None:
    """metrics.jsonl as pretraining leaves it: step records and an `eval` record per (align, unif, kNN) given."""
    lines = []
    for epoch, (align, unif, knn) in enumerate(evals):
        lines.append({"kind": "step", "epoch": epoch, "step": 10 * epoch + 5, "loss": 1.0, "align": 0.5})
        lines.append({"kind": "eval", "epochs_done": epoch, "step": 10 * epoch, "align_metric": align,
                      "unif_metric": unif, "knn_top1": knn, "eval_images": 5000})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "step", "ep'  # a line cut short by a kill
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")


def fabricate(root: Path) -> None:
    """The runs of the exact-markdown test: several cells, three seeds, and runs that are not in the table."""
    first = make_run(root, "v1-b128_contr-t0.07", preset="v1-b128", loss="contr-t0.07")
    add_probe(first, 72.80)
    add_evals(first, (0.9, -0.5, 20.0), (0.41234, -3.56789, 61.5))
    for seed, top1 in ((1, 67.90), (2, 68.30), (3, 68.10)):
        run = make_run(root, f"v2-b256_align3-unif3_seed{seed}", preset="v2-b256", loss="align3-unif3",
                       sets=(f"run.seed={seed}",))
        add_probe(run, top1)
    add_probe(make_run(root, "v2-b256_contr-t0.2", preset="v2-b256", loss="contr-t0.2"), 66.00)
    add_probe(make_run(root, "v2-b256_align3-unif3_e100", preset="v2-b256", loss="align3-unif3",
                       sets=("optim.epochs=100",)), 70.10)
    both = make_run(root, "v1-b256_align3-unif3", preset="v1-b256", loss="align3-unif3")
    add_probe(both, 69.50)
    add_probe(both, 68.90, name="cached", kind="cached-features")
    add_probe(make_run(root, "v2-b128_align2-unif2", preset="v2-b128", loss="align2-unif2", state="stopped"),
              71.25, finished=False, epochs_done=37)
    add_probe(make_run(root, "in1k_align3-unif3", preset="in1k-v2-b256", loss="align3-unif3", dataset="imagenet"),
              67.80, top5=88.1)
    demo = make_run(root, "demo_align3-unif3", preset="demo", loss="align3-unif3", dataset="digits")
    add_probe(demo, 91.30, top5=99.5)
    add_evals(demo, (0.25, -3.0, None))


EXPECTED_MARKDOWN = """\
<!-- mauctl report: published vs reproduced linear top-1 (%) -->

# Reference validation accuracy

Published / reproduced (difference); reproduced = best top-1 of the linear probe, mean ± std over seeds. \
Bold: best of the row (reproduced when the row has runs, else published). †: runs listed under "Not in the table".

## ImageNet-100

| Augmentation | Batch Size | Initial LR | contr-t0.07 | contr-t0.2 | align2-unif2 | align3-unif3 | align4-unif4 |
| --- | --- | --- | --- | --- | --- | --- | --- |
| Normal | 128 | 0.03 | **73.12 (MoCo) / 72.80 (-0.32)** | 75.54 | 75.44 | 75.62 | 74.52 |
|  | 256 | 0.03 | 68.18 (MoCo) | 69.3 | 68.28 | **69.66 / 69.50 (-0.16)** † | 69.46 |
|  | 256 | 0.06 | 71.08 (MoCo) | **73.52** | 73.34 | 73.36 | 73.18 |
| Strong Aug. + MLP Head + Cosine LR | 128 | 0.03 | 73.92 | 77.54 (MoCo v2) | 77.4 † | **77.66** | 76.7 |
|  | 256 | 0.03 | 69.64 | 67.52 (MoCo v2) / 66.00 (-1.52) | 66.92 | \
**67.44 / 68.10 ± 0.20 (n=3) (+0.66)** † | 71.42 |
|  | 256 | 0.06 | 73.36 | **76.32 (MoCo v2)** | 75.5 | 75.74 | 73.84 |

## ImageNet

| Augmentation | Batch Size | Initial LR | contr-t0.07 | contr-t0.2 | align2-unif2 | align3-unif3 | align4-unif4 |
| --- | --- | --- | --- | --- | --- | --- | --- |
| Strong Aug. + MLP Head + Cosine LR | 256 | 0.03 | - | 67.5 ± 0.1 (MoCo v2) | - | **67.694 / 67.80 (+0.11)** | - |

## Not in the table

Runs of a table cell that differ from the published protocol, with every difference.

|  | Run | Probe | Cell | Best top-1 | Published | Reasons |
| --- | --- | --- | --- | --- | --- | --- |
| † | runs/v1-b256_align3-unif3 | cached | ImageNet-100 v1-b256 align3-unif3 | 68.90 | 69.66 | probe: cached features |
| † | runs/v2-b128_align2-unif2 | lincls | ImageNet-100 v2-b128 align2-unif2 | 71.25 | 77.4 | \
pretraining not finished (state stopped); probe unfinished (37/100 epochs) |
| † | runs/v2-b256_align3-unif3_e100 | lincls | ImageNet-100 v2-b256 align3-unif3 | 70.10 | 67.44 | \
pretrained 100 epochs, not 200 |

## Other runs

| Run | Dataset | Preset | Loss | Probe | Best top-1 | Top-5 | Why not a cell |
| --- | --- | --- | --- | --- | --- | --- | --- |
| runs/demo_align3-unif3 | 10 classes | demo | align3-unif3 | lincls | 91.30 | 99.50 | \
dataset: 10 classes, not ImageNet-100 or ImageNet; no published row for aug v2, batch 128, LR 0.015 |

## Representation diagnostics

Each pretraining run's last alignment and uniformity metrics (lower is better) and kNN top-1, from the eval records of its metrics.jsonl; - where it has none.

| Run | Loss | Probe | Best top-1 | Align | Uniform | kNN top-1 | After epochs |
| --- | --- | --- | --- | --- | --- | --- | --- |
| runs/demo_align3-unif3 | align3-unif3 | lincls | 91.30 | 0.2500 | -3.0000 | - | 0 |
| runs/in1k_align3-unif3 | align3-unif3 | lincls | 67.80 | - | - | - | - |
| runs/v1-b128_contr-t0.07 | contr-t0.07 | lincls | 72.80 | 0.4123 | -3.5679 | 61.50 | 1 |
| runs/v1-b256_align3-unif3 | align3-unif3 | cached | 68.90 | - | - | - | - |
| runs/v1-b256_align3-unif3 | align3-unif3 | lincls | 69.50 | - | - | - | - |
| runs/v2-b128_align2-unif2 | align2-unif2 | lincls | 71.25 | - | - | - | - |
| runs/v2-b256_align3-unif3_e100 | align3-unif3 | lincls | 70.10 | - | - | - | - |
| runs/v2-b256_align3-unif3_seed1 | align3-unif3 | lincls | 67.90 | - | - | - | - |
| runs/v2-b256_align3-unif3_seed2 | align3-unif3 | lincls | 68.30 | - | - | - | - |
| runs/v2-b256_align3-unif3_seed3 | align3-unif3 | lincls | 68.10 | - | - | - | - |
| runs/v2-b256_contr-t0.2 | contr-t0.2 | lincls | 66.00 | - | - | - | - |
"""


def invoke(*args: str):
    return CliRunner().invoke(app, ["report", *args], env={"COLUMNS": "200"})


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    fabricate(tmp_path / "runs")
    return tmp_path / "runs"


def test_markdown_of_a_set_of_runs_is_exactly_the_readme_layout(runs):
    result = invoke("runs", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert result.stdout == EXPECTED_MARKDOWN


def test_default_scans_runs_in_the_working_directory(runs):
    result = invoke("--format", "markdown")
    assert result.exit_code == 0, result.output
    assert result.stdout == EXPECTED_MARKDOWN


def test_a_run_directory_given_alone_fills_only_its_cell(runs):
    result = invoke("runs/v1-b128_contr-t0.07", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| Normal | 128 | 0.03 | **73.12 (MoCo) / 72.80 (-0.32)** | 75.54 |" in result.stdout
    assert "## Not in the table" not in result.stdout and "## Other runs" not in result.stdout


def test_without_runs_the_cells_show_the_published_values_and_the_published_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    result = invoke("--format", "markdown")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = lines.index("## ImageNet-100") + 4
    assert lines[start:start + 6] == [
        "| Normal | 128 | 0.03 | 73.12 (MoCo) | 75.54 | 75.44 | **75.62** | 74.52 |",  # the `best` key
        "|  | 256 | 0.03 | 68.18 (MoCo) | 69.3 | 68.28 | **69.66** | 69.46 |",  # the highest published
        "|  | 256 | 0.06 | 71.08 (MoCo) | **73.52** | 73.34 | 73.36 | 73.18 |",
        "| Strong Aug. + MLP Head + Cosine LR | 128 | 0.03 | 73.92 | 77.54 (MoCo v2) | 77.4 | **77.66** | 76.7 |",
        "|  | 256 | 0.03 | 69.64 | 67.52 (MoCo v2) | 66.92 | 67.44 | **71.42** |",
        "|  | 256 | 0.06 | 73.36 | **76.32 (MoCo v2)** | 75.5 | 75.74 | 73.84 |",
    ]
    assert "| Strong Aug. + MLP Head + Cosine LR | 256 | 0.03 | - | 67.5 ± 0.1 (MoCo v2) | - | **67.694** | - |" in lines
    assert lines[-3:] == ["Notes:", "", "- No finished runs were found: only the published numbers are shown."]
    assert "## Not in the table" not in result.stdout


def test_no_runs_folder_still_prints_the_published_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke()
    assert result.exit_code == 0, result.output
    assert "73.12 (MoCo)" in result.stdout and "No finished runs were found" in result.stdout


def rich_report(width: int, *paths: str, terminal: bool = False) -> str:
    """What `mauctl report PATHS` prints at ``width`` columns: into a pipe, or into a colour terminal."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, soft_wrap=True, force_terminal=terminal,  # soft_wrap: as the CLI's
                      color_system="standard" if terminal else None)
    run_report([Path(p) for p in paths], console=console, err_console=console)
    return buffer.getvalue()


LOSS_COLUMNS = ["contr-t0.07", "contr-t0.2", "align2-unif2", "align3-unif3", "align4-unif4"]
FABRICATED_RUNS = ["runs/v1-b128_contr-t0.07", "runs/v2-b256_align3-unif3_seed1", "runs/v2-b256_align3-unif3_seed2",
                   "runs/v2-b256_align3-unif3_seed3", "runs/v2-b256_contr-t0.2", "runs/v2-b256_align3-unif3_e100",
                   "runs/v1-b256_align3-unif3", "runs/v2-b128_align2-unif2", "runs/in1k_align3-unif3",
                   "runs/demo_align3-unif3"]
NOT_IN_THE_TABLE_AT_ANY_WIDTH = """\
Not in the table: runs of a cell that differ from the published protocol
† runs/v1-b256_align3-unif3, probe cached: top-1 68.90
  in ImageNet-100 v1-b256 align3-unif3, published 69.66
  - probe: cached features
† runs/v2-b128_align2-unif2, probe lincls: top-1 71.25
  in ImageNet-100 v2-b128 align2-unif2, published 77.4
  - pretraining not finished (state stopped)
  - probe unfinished (37/100 epochs)
† runs/v2-b256_align3-unif3_e100, probe lincls: top-1 70.10
  in ImageNet-100 v2-b256 align3-unif3, published 67.44
  - pretrained 100 epochs, not 200

Other runs: not a cell of the published tables
runs/demo_align3-unif3, probe lincls: top-1 91.30, top-5 99.50
  dataset 10 classes, preset demo, loss align3-unif3
  - dataset: 10 classes, not ImageNet-100 or ImageNet
  - no published row for aug v2, batch 128, LR 0.015
"""


def stripped(text: str) -> str:
    """Without the spaces rich pads table cells with at the end of a line."""
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def test_a_user_at_80_columns_or_in_a_pipe_sees_every_loss_run_and_reason_whole(runs):
    result = run_mauctl("report", "runs", cwd=runs.parent, COLUMNS="80")  # stdout is a pipe, as with `| cat`
    assert result.returncode == 0, result.stderr
    text = stripped(result.stdout)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    # each row of the published table is a heading over one line per loss column
    assert """\
Strong Aug. + MLP Head + Cosine LR, batch 256, LR 0.03
  contr-t0.07   69.64
  contr-t0.2    67.52 (MoCo v2) / 66.00 (-1.52)
  align2-unif2  66.92
  align3-unif3  **67.44 / 68.10 ± 0.20 (n=3) (+0.66)** †
  align4-unif4  71.42
""" in text
    assert NOT_IN_THE_TABLE_AT_ANY_WIDTH in text
    # the diagnostics: one run and probe per line, its metrics under it
    assert """\
runs/v1-b128_contr-t0.07 (contr-t0.07), probe lincls: top-1 72.80
  align 0.4123, uniform -3.5679, kNN top-1 61.50, after 1 epoch
runs/v1-b256_align3-unif3 (align3-unif3), probe cached: top-1 68.90
  no eval records in its metrics.jsonl
""" in text
    assert text.endswith("""\
Published / reproduced (difference); reproduced = best top-1 of the linear
probe, mean ± std over seeds. **bold**: best of the row (reproduced when the row
has runs, else published). †: runs listed under "Not in the table".
""")


# the README's tables name each loss once in their header; the narrow layout once per row (6 + 1)
@pytest.mark.parametrize(("width", "loss_names"), [(80, 7), (100, 7), (200, 2)])
def test_no_loss_run_or_reason_is_cut_at_any_width(runs, width, loss_names):
    text = stripped(rich_report(width, "runs"))
    lines = text.splitlines()
    assert "…" not in text
    assert max(len(line) for line in lines) <= width
    tables = text[:text.index("Not in the table")]
    for loss in LOSS_COLUMNS:  # whole, not folded onto two lines
        assert len(re.findall(rf"(?<![\w.-]){re.escape(loss)}(?![\w.-])", tables)) == loss_names, loss
    for run in FABRICATED_RUNS:
        assert run in text, run
    assert NOT_IN_THE_TABLE_AT_ANY_WIDTH in text


def test_a_wide_console_gets_the_readme_layout_and_a_narrow_one_a_heading_per_row(runs):
    wide, narrow = rich_report(200, "runs"), rich_report(100, "runs")
    assert "│ Normal            │ 128        │ 0.03       │ **73.12 (MoCo) / 72.80 (-0.32)** │" in wide
    assert "│ Strong Aug. + MLP │ 128        │ 0.03       │" in wide and "│ Head + Cosine LR  │" in wide
    assert "│ runs/v1-b128_contr-t0.07        │ contr-t0.07  │ lincls │      72.80 │ 0.4123 │ -3.5679 │" \
        in wide
    assert "Normal, batch 128, LR 0.03\n  contr-t0.07   **73.12 (MoCo) / 72.80 (-0.32)**\n" in narrow
    assert "Normal, batch 128, LR 0.03" not in wide and "│ Normal" not in narrow


def test_in_a_terminal_the_best_of_a_row_is_bold(runs):
    text = rich_report(200, "runs", terminal=True)
    assert "\x1b[1m73.12 (MoCo) / 72.80 (-0.32)\x1b[0m" in text
    assert "**" not in text and "Bold: best of the row" in text


def test_csv_has_one_line_per_cell_and_per_entry(runs):
    result = invoke("runs", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    cell = [r for r in rows if r["row"] == "v2-b256" and r["loss"] == "align3-unif3" and r["table"] == "imagenet100"]
    assert [r["kind"] for r in cell] == ["cell", "entry", "entry", "entry", "not-in-table"]
    assert {k: cell[0][k] for k in ("published", "reproduced_mean", "reproduced_std", "n", "diff", "best")} == {
        "published": "67.44", "reproduced_mean": "68.1", "reproduced_std": "0.2", "n": "3", "diff": "0.66",
        "best": "true"}
    assert sorted(r["run"] for r in cell[1:4]) == [f"runs/v2-b256_align3-unif3_seed{s}" for s in (1, 2, 3)]
    assert cell[4]["reasons"] == "pretrained 100 epochs, not 200"
    other = [r for r in rows if r["kind"] == "other"]
    assert [(r["run"], r["best_top1"]) for r in other] == [("runs/demo_align3-unif3", "91.3")]
    assert [(r["align_metric"], r["unif_metric"], r["knn_top1"]) for r in other] == [("0.25", "-3.0", "")]
    assert len([r for r in rows if r["kind"] == "cell"]) == 7 * 5


def test_json_has_the_same_content(runs):
    result = invoke("runs", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "mauctl.report/1"
    table = next(t for t in data["tables"] if t["table"] == "imagenet100")
    row = next(r for r in table["rows"] if r["row"] == "v2-b256")
    cell = next(c for c in row["cells"] if c["loss"] == "align3-unif3")
    assert {k: cell[k] for k in ("published", "reproduced_mean", "reproduced_std", "n", "diff", "best",
                                 "not_in_table")} == {
        "published": 67.44, "reproduced_mean": 68.1, "reproduced_std": 0.2, "n": 3, "diff": 0.66, "best": True,
        "not_in_table": 1}
    assert sorted(e["best_top1"] for e in cell["entries"]) == [67.9, 68.1, 68.3]
    published_best = next(c for c in next(r for r in table["rows"] if r["row"] == "v2-b128")["cells"]
                          if c["best"])
    assert (published_best["loss"], published_best["n"]) == ("align3-unif3", 0)
    reasons = {(e["run"], e["probe"]): e["reasons"] for e in data["not_in_table"]}
    assert reasons[("runs/v2-b128_align2-unif2", "lincls")] == [
        "pretraining not finished (state stopped)", "probe unfinished (37/100 epochs)"]
    assert [e["dataset"] for e in data["other_runs"]] == ["10 classes"]
    first = next(e for c in data["tables"][0]["rows"][0]["cells"] for e in c["entries"])
    assert (first["run"], first["align_metric"], first["unif_metric"], first["knn_top1"],
            first["diagnostics_epoch"]) == ("runs/v1-b128_contr-t0.07", 0.41234, -3.56789, 61.5, 1)


def test_every_difference_from_the_protocol_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "runs", "odd", preset="v1-b128", loss="align3-unif3",
                   sets=("optim.epochs=100", "model.queue_size=4096", "optim.weight_decay=0.0005",
                         "loss.intra_batch=false"), state="running")
    add_probe(run, 60.0, epochs=50, lr=10.0, kind="cached-features", crop_scale=0.5, flip=False)
    data = json.loads(invoke("runs", "--format", "json").stdout)
    [entry] = data["not_in_table"]
    assert (entry["table"], entry["row"], entry["loss"]) == ("imagenet100", "v1-b128", "align3-unif3")
    assert entry["reasons"] == [
        "uniformity over the queue only (Eq. 17); the table uses Eq. 18",
        "pretrained 100 epochs, not 200",
        "queue 4096, not 65536",
        "weight decay 0.0005, not 0.0001",
        "pretraining not finished (state running)",
        "probe: cached features",
        "probe: 50 epochs, not 100",
        "probe: LR 10, not 30",
        "probe: training crops from 0.5 of the image, not 0.08",
        "probe: no flipped training views",
    ]


def test_uniformity_over_the_global_batch_is_listed_apart_from_the_per_gpu_cells(tmp_path, monkeypatch):
    """The table's L_uniform is per GPU. A run that took it over the global batch at once, by choice or because
    an older mauctl wrote its config (no loss.unif_groups), is listed apart; a contrastive one is not concerned."""
    monkeypatch.chdir(tmp_path)
    add_probe(make_run(tmp_path / "runs", "chosen", preset="v2-b256", loss="align3-unif3",
                       sets=("loss.unif_groups='global'",)), 65.0)
    for name, loss in (("old", "align3-unif3"), ("old-contrastive", "contr-t0.2")):
        run = make_run(tmp_path / "runs", name, preset="v2-b256", loss=loss)
        config = run / "config.toml"
        config.write_text(config.read_text().replace('unif_groups = "bn"\n', ""))
        add_probe(run, 66.0)
    add_probe(make_run(tmp_path / "runs", "per-gpu", preset="v2-b256", loss="align3-unif3"), 67.0)
    data = json.loads(invoke("runs", "--format", "json").stdout)
    apart = {e["run"]: (e["row"], e["loss"], e["reasons"]) for e in data["not_in_table"]}
    reason = ["uniformity over the global batch at once; the table's is per GPU"]
    assert apart == {"runs/chosen": ("v2-b256", "align3-unif3", reason),
                     "runs/old": ("v2-b256", "align3-unif3", reason)}
    in_cells = sorted(e["run"] for t in data["tables"] for r in t["rows"] for c in r["cells"] for e in c["entries"])
    assert in_cells == ["runs/old-contrastive", "runs/per-gpu"]


def test_a_custom_loss_and_an_external_checkpoint_are_other_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    custom = make_run(tmp_path / "runs", "custom", preset="v2-b256", loss="align3-unif3", sets=("loss.unif_t=5.0",))
    add_probe(custom, 65.0)
    external = add_probe(make_run(tmp_path / "tmp", "x", preset="v2-b256", loss="contr-t0.2"), 66.0)
    data = json.loads(external.read_text())
    data["pretrain"].update(source="moco", run_dir=None, config=None, path="/ckpt/moco_v2_200ep.pth.tar")
    write_probe_folder(tmp_path / "runs" / "moco_v2_200ep-lincls" / "lincls" / "lincls", data)
    result = json.loads(invoke("runs", "--format", "json").stdout)
    assert [(e["run"], e["loss"], e["reasons"]) for e in result["other_runs"]] == [
        ("/ckpt/moco_v2_200ep.pth.tar", "-", ["no pretraining config (moco checkpoint)"]),
        ("runs/custom", "custom", ["loss matches no published column"]),
    ]


def write_random_init_probe(folder: Path, checkpoint: str, scratch: Path) -> Path:
    """What `mauctl demo` leaves in ``folder``: the probe of a torchvision state dict, its path stored as given."""
    results = json.loads(add_probe(make_run(scratch, "x", preset="demo", loss="align3-unif3", dataset="digits"),
                                   12.5, name="random-init").read_text())
    results["pretrain"].update(source="torchvision", path=checkpoint, run_dir=None, config=None, epoch=None)
    return write_probe_folder(folder / "lincls", results)


def test_the_demo_baseline_is_labelled_where_its_results_lie_wherever_the_report_runs(tmp_path, monkeypatch):
    # `mauctl demo --out runs`, run in tmp_path, stored the checkpoint path relative to tmp_path
    write_random_init_probe(tmp_path / "runs" / "demo-random-init", "runs/demo-random-init/encoder.pt",
                            scratch=tmp_path / "scratch")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, argument, label in [
        (tmp_path, "runs/demo-random-init", "runs/demo-random-init/lincls"),
        (tmp_path / "runs", ".", "demo-random-init/lincls"),
        (elsewhere, str(tmp_path / "runs" / "demo-random-init"), f"{tmp_path}/runs/demo-random-init/lincls"),
    ]:
        monkeypatch.chdir(cwd)
        data = json.loads(invoke(argument, "--format", "json").stdout)
        assert [(e["run"], e["probe"], e["best_top1"]) for e in data["other_runs"]] == \
            [(label, "random-init", 12.5)], cwd


def test_out_writes_the_report_and_refuses_a_foreign_file(runs, tmp_path):
    target = tmp_path / "table.md"
    result = invoke("runs", "--format", "markdown", "--out", str(target))
    assert result.exit_code == 0, result.output
    assert target.read_text(encoding="utf-8") == EXPECTED_MARKDOWN
    assert result.stdout == ""
    again = invoke("runs", "--format", "csv", "--out", str(target))  # a report of ours: replaced
    assert again.exit_code == 0, again.output
    assert target.read_text(encoding="utf-8").startswith("kind,table,row,loss,published")
    json_target = tmp_path / "table.json"
    assert invoke("runs", "--format", "json", "--out", str(json_target)).exit_code == 0
    assert invoke("runs", "--format", "json", "--out", str(json_target)).exit_code == 0

    foreign = tmp_path / "notes.md"
    foreign.write_text("my own notes\n", encoding="utf-8")
    refused = invoke("runs", "--format", "markdown", "--out", str(foreign))
    assert refused.exit_code == 2
    assert "notes.md" in refused.output and "mauctl did not write it" in refused.output
    assert foreign.read_text(encoding="utf-8") == "my own notes\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_writes_a_png_and_refuses_a_foreign_file(runs, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "cells.png"
    result = invoke("runs", "--format", "markdown", "--plot", str(target))
    assert result.exit_code == 0, result.output
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert invoke("runs", "--plot", str(target)).exit_code == 0  # a plot of ours: replaced

    foreign = tmp_path / "photo.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    refused = invoke("runs", "--plot", str(foreign))
    assert refused.exit_code == 2 and "photo.png" in refused.output
    assert foreign.read_bytes() == b"\x89PNG\r\n\x1a\n" + b"\0" * 100


def test_plot_scatters_uniformity_against_alignment_coloured_by_top1(runs):
    pytest.importorskip("matplotlib")
    from mauctl.report import build_tables, collect, plot_figure

    add_probe(runs / "v1-b128_contr-t0.07", 80.0, name="cached", kind="cached-features")  # a second probe
    fig = plot_figure(build_tables(collect([runs])))
    cells, scatter, _colorbar = fig.axes
    assert cells.get_title() == "Linear top-1: reproduced vs published" and fig.get_suptitle() == ""
    assert "Alignment and uniformity" in scatter.get_title()
    (dots,) = scatter.collections
    # one point per run with eval records, in report order: demo, then v1-b128 (its last record, not its
    # first), coloured by its published-protocol probe rather than its cached one
    assert dots.get_offsets().tolist() == [[-3.0, 0.25], [-3.56789, 0.41234]]
    assert dots.get_array().tolist() == [91.3, 72.8]
    # the points with 15% of their spread around them
    assert scatter.get_xlim() == pytest.approx((-3.56789 - 0.15 * 0.56789, -3.0 + 0.15 * 0.56789))
    assert scatter.get_ylim() == pytest.approx((0.25 - 0.15 * 0.16234, 0.41234 + 0.15 * 0.16234))


def test_plot_without_a_reproduced_cell_is_the_scatter_alone_and_frames_one_run_readably(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from mauctl.report import NO_CELL_NOTE, build_tables, collect, plot_figure

    monkeypatch.chdir(tmp_path)
    demo = make_run(tmp_path / "runs", "demo", preset="demo", loss="align3-unif3", dataset="digits")
    add_probe(demo, 91.3)
    add_evals(demo, (0.9, -0.5, 20.0), (0.25, -3.0, 80.0))
    fig = plot_figure(build_tables(collect([tmp_path / "runs"])))
    scatter, colorbar = fig.axes  # no reproduced-vs-published panel: it would be an empty diagonal
    assert scatter.get_title() == "Alignment and uniformity of each run (colour: linear top-1)"
    assert colorbar.get_ylabel() == "linear top-1 (%)"
    assert fig.get_suptitle() == NO_CELL_NOTE
    # one run: a frame of 0.2 around its point, not ±1e-4 of rounding noise
    assert scatter.get_xlim() == pytest.approx((-3.1, -2.9))
    assert scatter.get_ylim() == pytest.approx((0.15, 0.35))


def test_plot_without_matplotlib_says_how_to_install_it(runs, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = invoke("runs", "--plot", str(tmp_path / "cells.png"))
    assert result.exit_code == 2
    assert "pip install 'mauctl[plot]'" in result.output
    assert not (tmp_path / "cells.png").exists()


def test_a_missing_path_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("no/such/runs")
    assert result.exit_code == 2
    assert "no/such/runs" in result.output


def test_an_unknown_format_is_a_usage_error(runs):
    result = invoke("runs", "--format", "html")
    assert result.exit_code == 2 and "html" in result.output


def test_a_run_that_collapsed_is_marked_in_the_diagnostics_of_every_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "runs", "small", preset="v2-b128", loss="align3-unif3", sets=("optim.batch_size=16",))
    add_probe(run, 22.0)
    add_evals(run, (0.5, -1.0, 54.0), (4.6e-4, -9.9e-4, 22.0))
    warning = {"kind": "warning", "what": "collapse", "epoch": 1, "step": 30, "step_in_epoch": 20, "q_std": 0.001}
    with (run / "metrics.jsonl").open("a") as f:  # after the line a kill cut short: a later start's record
        f.write("\n" + json.dumps(warning) + "\n" + json.dumps({**warning, "epoch": 5}) + "\n")
    healthy = make_run(tmp_path / "runs", "healthy", preset="v2-b128", loss="align3-unif3")
    add_probe(healthy, 70.0)

    markdown = invoke("runs", "--format", "markdown").stdout
    assert ("| runs/small | align3-unif3 | lincls | 22.00 | 0.0005 | -0.0010 | 22.00 | 1 (collapsed at epoch 2) |"
            in markdown)
    assert "| runs/healthy | align3-unif3 | lincls | 70.00 | - | - | - | - |" in markdown
    assert "runs/small" in rich_report(200, "runs") and "1 (collapsed at epoch 2)" in rich_report(200, "runs")
    narrow = " ".join(rich_report(80, "runs").split())
    assert ("runs/small (align3-unif3), probe lincls: top-1 22.00 align 0.0005, uniform -0.0010, kNN top-1 "
            "22.00, after 1 epoch; collapsed at epoch 2") in narrow
    assert "no eval records in its metrics.jsonl runs/" in narrow  # the healthy run: no mark
    data = json.loads(invoke("runs", "--format", "json").stdout)
    entries = [e for t in data["tables"] for r in t["rows"] for c in r["cells"] for e in c["entries"]]
    assert {e["run"]: e["collapsed_epoch"] for e in entries + data["other_runs"]} == {
        "runs/small": 2, "runs/healthy": None}
    rows = list(csv.DictReader(io.StringIO(invoke("runs", "--format", "csv").stdout)))
    assert {r["run"]: r["collapsed_epoch"] for r in rows if r["run"]} == {"runs/small": "2", "runs/healthy": ""}
