"""Bad input to every command, as one table: the command line, the exit status, what the message names.

Every case must exit with 2 (a usage or config error, before any worker starts), print a message
that names the problem, show no traceback, and write nothing: the working directory is the same
afterwards, file for file. The cases run the real Typer app in this process, with the launcher
replaced by one that fails the test, so no case can start a worker. A few cases run
``python -m mauctl`` for real, to prove the exit status and the output from outside.

Cases already covered elsewhere are not repeated here: the pretrain config errors
(tests/test_cli_pretrain_dry_run.py, tests/test_config.py), subset's class lists and links
(tests/test_subset.py, tests/test_untrusted.py), report's and export's own option checks.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import run_mauctl, write_image_folder
from mauctl import cli
from mauctl.backbone import build_encoder

SMALL = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--set", "model.queue_size=32",
         "--workers", "0"]
PROBE = ["--batch-size", "8", "--workers", "0", "--image-size", "16"]
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """What the cases point at. Tests must leave it as it is."""
    root = tmp_path_factory.mktemp("workspace")
    data = write_image_folder(root / "data", classes=2, per_class=8, size=(16, 16))
    write_image_folder(data, classes=2, per_class=2, size=(16, 16), split="val")
    write_image_folder(root / "train-only", classes=2, per_class=8, size=(16, 16))
    torch.save(build_encoder("resnet18", 10).state_dict(), root / "weights.pt")
    (root / "notes.txt").write_text("not a checkpoint, not a folder\n")
    (root / "bad.toml").write_text("# my settings\n[optim]\nlr = \n")
    (root / "latin1.toml").write_bytes(b"[optim]\n# caf\xe9\nlr = 0.1\n")
    (root / "secret.toml").write_text("[optim]\nlr = 0.1\n")
    (root / "secret.toml").chmod(0)
    (root / "mine.md").write_text("my own notes\n")
    return root


@pytest.fixture(scope="module")
def busy_port():
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(autouse=True)
def in_workspace(workspace, monkeypatch):
    for name in list(os.environ):
        if name.startswith("MAUCTL_") or name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name)
    monkeypatch.setitem(cli._debug, "on", False)
    monkeypatch.chdir(workspace)

    def launch(*args, **kwargs):
        raise AssertionError("a worker was about to start")

    monkeypatch.setattr("mauctl.worker.start", launch)


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in root.rglob("*")}


def case(id: str, args: list[str], *fragments: str, status: int = 2, skip: str | None = None):
    marks = [pytest.mark.skip(reason=skip)] if skip else []
    return pytest.param(args, status, fragments, id=id, marks=marks)


CASES = [
    # presets
    case("presets: unknown format", ["presets", "--format", "yaml"], "--format 'yaml'", "rich or json"),
    case("presets: extra argument", ["presets", "v1-b128"], "unexpected extra argument"),
    # pretrain: paths
    case("pretrain: missing DATA", ["pretrain", "nowhere", *SMALL], "nowhere does not exist"),
    case("pretrain: DATA is a file", ["pretrain", "notes.txt", *SMALL], "notes.txt does not exist or is not a dir"),
    case("pretrain: DATA without train/", ["pretrain", ".", *SMALL], "train does not exist", "holds class-like"),
    case("pretrain: missing --config", ["pretrain", "data", "--config", "nope.toml"], "nope.toml: no such file"),
    case("pretrain: --config is a folder", ["pretrain", "data", "--config", "data"],
         "data: cannot read it as a TOML file"),
    case("pretrain: --config not UTF-8", ["pretrain", "data", "--config", "latin1.toml"],
         "latin1.toml: cannot read it as a TOML file (UnicodeDecodeError)"),
    case("pretrain: unreadable --config", ["pretrain", "data", "--config", "secret.toml"],
         "secret.toml: cannot read it as a TOML file (PermissionError)", skip="root reads any file" if ROOT else None),
    case("pretrain: --out is a file", ["pretrain", "data", *SMALL, "--out", "notes.txt"],
         "notes.txt exists and is not a directory"),
    case("pretrain: --out inside a file", ["pretrain", "data", *SMALL, "--out", "notes.txt/run"],
         "notes.txt is a file, not a folder"),
    # pretrain: values
    case("pretrain: max_bad_fraction above 1", ["pretrain", "data", *SMALL, "--set", "data.max_bad_fraction=1.5"],
         "data.max_bad_fraction = 1.5", "less than or equal to 1"),
    case("pretrain: max_bad_fraction a boolean", ["pretrain", "data", *SMALL, "--set", "data.max_bad_fraction=true"],
         "data.max_bad_fraction = True", "expected a number, got a boolean"),
    case("pretrain: max_bad_fraction misspelt", ["pretrain", "data", *SMALL, "--set", "data.max_bad_fractoin=0.1"],
         "unknown key 'data.max_bad_fractoin' (did you mean 'data.max_bad_fraction'?)"),
    case("pretrain: --workers a word", ["pretrain", "data", "--workers", "many"], "data.workers = 'many'",
         "expected 'auto' or a number"),
    case("pretrain: --device cuda without a GPU", ["pretrain", "data", *SMALL, "--device", "cuda"],
         "run.device = 'cuda', but 0 CUDA GPUs visible", skip="a GPU is visible" if torch.cuda.is_available()
         else None),
    # pretrain: conflicts and checkpoints
    case("pretrain: --resume PATH with --overwrite",
         ["pretrain", "data", *SMALL, "--resume", "weights.pt", "--overwrite"], "contradict each other"),
    case("pretrain: --resume a missing file", ["pretrain", "data", *SMALL, "--resume", "last.pt"],
         "--resume last.pt: no such checkpoint file"),
    case("pretrain: --resume not a checkpoint", ["pretrain", "data", *SMALL, "--resume", "notes.txt"],
         "--resume notes.txt: notes.txt is not a readable checkpoint"),
    case("pretrain: --resume another kind of checkpoint", ["pretrain", "data", *SMALL, "--resume", "weights.pt"],
         "--resume weights.pt is not a mauctl pretraining checkpoint"),
    # pretrain: the rendezvous
    case("pretrain: rendezvous port out of range", ["pretrain", "data", *SMALL, "--rdzv-endpoint", "localhost:70000"],
         "the port must be 1 to 65535"),
    case("pretrain: rendezvous port in use", ["pretrain", "data", *SMALL, "--rdzv-endpoint", "127.0.0.1:{port}"],
         "port {port} is already in use on this machine"),
    # lincls
    case("lincls: missing checkpoint", ["lincls", "nowhere.pt", "data"], "nowhere.pt: no such file or directory"),
    case("lincls: not a checkpoint", ["lincls", "notes.txt", "data"], "notes.txt is not a readable checkpoint"),
    case("lincls: DATA without val/", ["lincls", "weights.pt", "train-only", *PROBE], "train-only/val does not exist",
         "The linear probe measures top-1 on", "train-only/val/<class>/<image>: held-out images of the classes in"),
    case("lincls: --epochs a word", ["lincls", "weights.pt", "data", "--epochs", "ten"],
         "Invalid value for '--epochs'"),
    case("lincls: a pretraining option", ["lincls", "weights.pt", "data", "--loss", "align3-unif3"],
         "No such option: --loss"),
    case("lincls: a pretraining key", ["lincls", "weights.pt", "data", "--set", "model.arch=resnet18"],
         "unknown section 'model'"),
    case("lincls: preset typo", ["lincls", "weights.pt", "data", "--preset", "linclss"],
         "unknown preset 'linclss' (did you mean 'lincls'?)"),
    case("lincls: a pretraining preset", ["lincls", "weights.pt", "data", "--preset", "demo"],
         "preset 'demo' is a pretrain preset, not a lincls one"),
    case("lincls: TOML syntax error", ["lincls", "weights.pt", "data", "--config", "bad.toml"],
         "bad.toml:3: TOML syntax error"),
    case("lincls: --name with a slash", ["lincls", "weights.pt", "data", *PROBE, "--name", "../up"],
         "--name '../up'"),
    case("lincls: --resume PATH with --overwrite",
         ["lincls", "weights.pt", "data", *PROBE, "--out", "probe", "--resume", "weights.pt", "--overwrite"],
         "contradict each other"),
    case("lincls: --evaluate with --overwrite", ["lincls", "weights.pt", "data", *PROBE, "--evaluate", "--overwrite"],
         "--evaluate and --overwrite contradict each other"),
    case("lincls: --evaluate before training", ["lincls", "weights.pt", "data", *PROBE, "--evaluate"],
         "--evaluate: no trained classifier"),
    case("lincls: --resume a pretraining-kind file", ["lincls", "weights.pt", "data", *PROBE, "--out", "probe",
                                                     "--resume", "weights.pt"],
         "--resume weights.pt is not a mauctl linear-probe checkpoint"),
    case("lincls: --out is a file", ["lincls", "weights.pt", "data", *PROBE, "--out", "notes.txt"],
         "notes.txt exists and is not a directory"),
    # subset
    case("subset: missing ImageNet", ["subset", "nowhere", "in100"], "ImageNet folder nowhere does not exist"),
    case("subset: --classes is a folder", ["subset", "data", "in100", "--classes", "data"],
         "cannot read classes file data"),
    # report
    case("report: missing run", ["report", "runs/nope"], "no such run directory or folder: runs/nope"),
    case("report: --out in a missing folder", ["report", "--out", "reports/table.md"],
         "the folder reports does not exist"),
    case("report: --out is a folder", ["report", "--out", "data"], "--out data is a folder"),
    case("report: --out is someone's file", ["report", "--out", "mine.md", "--format", "markdown"],
         "mauctl did not write it"),
    case("report: --out and --plot the same", ["report", "--out", "t.png", "--plot", "t.png"], "name the same file"),
    # export
    case("export: missing source", ["export", "nowhere.pt", "--out", "e.safetensors"], "nowhere.pt: no such file"),
    case("export: not a checkpoint", ["export", "notes.txt", "--out", "e.safetensors"],
         "notes.txt is not a readable checkpoint"),
    case("export: no --out", ["export", "weights.pt"], "Missing option '--out'"),
    case("export: --out is a folder", ["export", "weights.pt", "--out", "data"], "--out data is a folder"),
    case("export: --out is someone's file", ["export", "weights.pt", "--out", "mine.md"], "--out mine.md already exists"),
    case("export: --lincls with --head mlp", ["export", "weights.pt", "--out", "e.safetensors", "--head", "mlp",
                                              "--lincls", "probe"], "--lincls probe", "--head is mlp"),
    case("export: --head linear without a probe", ["export", "weights.pt", "--out", "e.safetensors",
                                                   "--head", "linear"], "--head linear needs a trained linear"),
    case("export: unknown --format", ["export", "weights.pt", "--out", "e.onnx", "--format", "onxx"],
         "--format 'onxx'", "did you mean 'onnx'?"),
    # demo
    case("demo: loss typo", ["demo", "--loss", "align3-unif4", "--out", "demo-runs"],
         "unknown loss 'align3-unif4'", "did you mean"),
    case("demo: --out is a file", ["demo", "--out", "notes.txt"], "--out notes.txt exists and is not a folder"),
]


@pytest.mark.parametrize("args, status, fragments", CASES)
def test_bad_input_is_refused_with_a_message_and_nothing_written(args, status, fragments, workspace, busy_port):
    args = [a.format(port=busy_port) for a in args]
    before = listing(workspace)
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # not an exception that escaped
    message = " ".join(result.stderr.split())  # rich and click may wrap long lines
    for fragment in fragments:
        assert fragment.format(port=busy_port) in message, message
    assert listing(workspace) == before


# ---------------------------------------------------------------- from outside, as a user runs it

OUTSIDE = [
    pytest.param(["lincls", "notes.txt", "data"], "notes.txt is not a readable checkpoint", id="not-a-checkpoint"),
    pytest.param(["pretrain", "data", "--config", "bad.toml"], "bad.toml:3: TOML syntax error", id="toml-syntax"),
    pytest.param(["pretrain", "data", *SMALL, "--epochs", "1", "--rdzv-endpoint", "127.0.0.1:{port}"],
                 "port {port} is already in use", id="port-in-use"),
    # the command line's own errors: the same one-line form as mauctl's, no box, exit 2
    pytest.param(["pretrain", "data", "-b", "16"], "error: No such option: -b Run 'mauctl pretrain --help' for the "
                 "options.", id="unknown-short-option"),
    pytest.param(["pretrain", "data", "--epochs", "ten"], "error: Invalid value for '--epochs'", id="not-a-number"),
    pytest.param(["lincls"], "error: Missing argument 'SOURCE'. Run 'mauctl lincls --help'", id="missing-argument"),
    pytest.param(["pretrian"], "error: No such command 'pretrian'", id="unknown-command"),
]


@pytest.mark.parametrize("args, fragment", OUTSIDE)
def test_a_real_process_exits_2_without_a_traceback(args, fragment, workspace, busy_port):
    before = listing(workspace)
    result = run_mauctl(*[a.format(port=busy_port) for a in args], cwd=workspace, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert fragment.format(port=busy_port) in " ".join(result.stderr.split())
    assert "Traceback" not in result.stdout + result.stderr and "╭" not in result.stderr
    assert listing(workspace) == before


def test_debug_adds_the_traceback_and_keeps_the_exit_status(workspace):
    result = run_mauctl("--debug", "lincls", "notes.txt", "data", cwd=workspace, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" in result.stderr and "error: notes.txt is not a readable checkpoint" in result.stderr
