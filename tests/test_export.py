"""`mauctl export`: every format and head, read back and compared with the source; and the refusals.

The sources are real files laid out as `mauctl pretrain` and `mauctl lincls` write them (built here
without training: a few seconds instead of minutes), an original MoCo checkpoint and a torchvision
state dict. Each export is read back here independently of mauctl's own check.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

import mauctl.export
from mauctl.backbone import build_encoder
from mauctl.cli import app
from mauctl.config import PretrainConfig, config_digest, to_toml
from mauctl.export import load_exported
from mauctl.moco import MoCo
from mauctl.weights import read_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
DIM = 32
CLASSES = 10
TOP1 = 91.5

# torchscript files are read back with torch.jit.load, which torch >= 2.10 calls deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@dataclass
class Run:
    """A pretraining run directory with one linear-probe result, and the modules the exports must equal."""

    path: Path
    checkpoint: Path  # <run>/checkpoints/last.pt
    lincls: Path  # <run>/lincls/lincls/best.pt
    config: PretrainConfig
    reference: dict[str, Callable[[torch.Tensor], torch.Tensor]]  # head (or "projection") -> function


def scramble(model: nn.Module, seed: int) -> None:
    """Random BatchNorm statistics and biases: a weight loaded under the wrong name changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.out_features, generator=g) * 0.1)


def make_run(root: Path, *, mlp: bool, small_stem: bool, seed: int = 0) -> Run:
    """``root`` as `mauctl pretrain` leaves it (config.toml, checkpoints/last.pt) after `mauctl lincls`."""
    torch.manual_seed(seed)
    config = PretrainConfig.model_validate({
        "data": {"image_size": IMAGE_SIZE, "workers": 0},
        "model": {"arch": "resnet18", "dim": DIM, "mlp": mlp, "small_stem": small_stem, "queue_size": 64},
        "optim": {"batch_size": 16, "epochs": 2},
        "run": {"out": str(root), "seed": seed},
    })
    moco = MoCo(config.model, bn_splits=2)
    scramble(moco.encoder_q, seed)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.03, momentum=0.9)
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.toml").write_text(to_toml(config))
    last = root / "checkpoints" / "last.pt"
    torch.save({
        "format": "mauctl.pretrain/1", "arch": "resnet18", "epoch": 2, "step_in_epoch": 0, "global_step": 6,
        "epoch_sums": {}, "epoch_count": 0,
        "encoder_q": moco.encoder_q.state_dict(), "encoder_k": moco.encoder_k.state_dict(),
        "queue": moco.queue.keys.detach().clone(), "queue_ptr": 0, "optimizer": optimizer.state_dict(),
        "scaler": {}, "rng": {"torch": torch.get_rng_state(), "python": [0] * 625},  # as saved then
        "config": config.model_dump(), "world_size": 1, "bn_splits": 2,
    }, last)

    probe = read_encoder(last).backbone_module(CLASSES)
    scramble(probe.fc, seed + 1)
    best = root / "lincls" / "lincls" / "best.pt"
    (best.parent / "checkpoints").mkdir(parents=True)
    lincls_checkpoint = {
        "format": "mauctl.lincls/1", "epoch": 3, "model": probe.state_dict(),
        "source": {"source": "mauctl", "path": str(last), "run_dir": str(root), "arch": "resnet18",
                   "small_stem": small_stem, "epoch": 2, "config_digest": config_digest(config),
                   "config": config.model_dump()},
        "summary": {"best_top1": TOP1, "best_epoch": 3},
    }
    torch.save(lincls_checkpoint, best)
    # the probe's last epoch, worse than its best: never the one exported
    later = {k: v + 1.0 if k.startswith("fc.") else v for k, v in probe.state_dict().items()}
    torch.save({**lincls_checkpoint, "epoch": 5, "model": later}, best.parent / "checkpoints" / "last.pt")

    projection = copy.deepcopy(moco.encoder_q).eval()
    features = copy.deepcopy(moco.encoder_q).eval()
    features.fc = nn.Identity()
    reference = {"none": features, "projection": projection, "mlp": lambda x: F.normalize(projection(x), dim=1),
                 "linear": probe.eval()}
    return Run(root, last, best, config, reference)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one thread is fastest, and several stall when the CPUs are shared with other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_v2(tmp_path_factory) -> Run:
    """MLP projection head, small-image stem. Shared: tests must not change it."""
    return make_run(tmp_path_factory.mktemp("v2") / "run", mlp=True, small_stem=True)


@pytest.fixture(scope="module")
def run_v1(tmp_path_factory) -> Run:
    """Linear projection head, torchvision's stem: a stock torchvision model. Shared: tests must not change it."""
    return make_run(tmp_path_factory.mktemp("v1") / "run", mlp=False, small_stem=False, seed=1)


def export(*args: object) -> Result:
    return CliRunner().invoke(app, ["export", *map(str, args)], env={"COLUMNS": "200"})


def printed_diff(output: str) -> float:
    match = re.search(r"max abs diff\W+([0-9][0-9.e+-]*)", output)
    assert match, output
    return float(match.group(1))


def batch(size: int = IMAGE_SIZE, n: int = 3) -> torch.Tensor:
    """Not the batch mauctl checks with: another size (3) and other values."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(123))


def read_back(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported file, loaded without mauctl.export: the way a downstream user would."""
    if fmt == "safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        head, dim = meta["head"], int(meta["dim"])
        model = build_encoder(meta["arch"], dim or 1, meta["mlp"] == "true" and head == "mlp",
                              meta["small_stem"] == "true")
        if head == "none":
            model.fc = nn.Identity()
        model.load_state_dict(load_file(path), strict=True)
        model.eval()
        return (lambda x: F.normalize(model(x), dim=1)) if head == "mlp" else model
    if fmt == "torchvision":
        state = torch.load(path, weights_only=True)
        model = torchvision.models.resnet18(num_classes=state["fc.weight"].shape[0])
        model.load_state_dict(state, strict=True)
        return model.eval()
    if fmt == "torchscript":
        return torch.jit.load(str(path)).eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def assert_same_outputs(model: Callable, reference: Callable, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        got, want = model(x), reference(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5
    return got


# ---------------------------------------------------------------- round trips

# (format, head, which run, arguments after the source, reference)
CASES = [
    ("safetensors", "none", "v2", [], "none"),
    ("safetensors", "mlp", "v2", ["--head", "mlp"], "mlp"),
    ("safetensors", "mlp", "v1", ["--head", "mlp"], "mlp"),
    ("safetensors", "linear", "v2", ["--head", "linear"], "linear"),  # the run's only probe
    ("torchscript", "none", "v2", ["--head", "none"], "none"),
    ("torchscript", "mlp", "v2", ["--head", "mlp"], "mlp"),
    ("torchscript", "linear", "v2", ["LINCLS"], "linear"),  # a lincls checkpoint: linear by default
    ("safetensors", "linear", "v1", ["PROBE_DIR"], "linear"),  # <run>/lincls/<name>: its best.pt
    ("onnx", "none", "v2", [], "none"),
    ("onnx", "mlp", "v2", ["--head", "mlp"], "mlp"),
    ("onnx", "linear", "v2", ["--lincls", "lincls"], "linear"),
    ("torchvision", "linear", "v1", ["CHECKPOINT", "--head", "linear"], "linear"),  # found from last.pt's run
    ("torchvision", "mlp", "v1", ["--head", "mlp"], "projection"),  # no normalisation in a state dict
]


@pytest.mark.parametrize(("fmt", "head", "which", "args", "reference"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_export_reads_back_to_the_same_outputs(request, tmp_path, fmt, head, which, args, reference):
    run: Run = request.getfixturevalue(f"run_{which}")
    source = run.path
    if args[:1] == ["LINCLS"]:
        source, args = run.lincls, args[1:]
    elif args[:1] == ["PROBE_DIR"]:
        source, args = run.lincls.parent, args[1:]
    elif args[:1] == ["CHECKPOINT"]:
        source, args = run.checkpoint, args[1:]
    out = tmp_path / "exports" / f"encoder.{fmt}"  # the folder does not exist yet

    result = export(source, "--out", out, "--format", fmt, *args)

    assert result.exit_code == 0, result.output
    assert printed_diff(result.output) <= 1e-5
    assert re.search(rf"│ head\s+│ {head}\s", result.output), result.output
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left
    got = assert_same_outputs(read_back(out, fmt), run.reference[reference], batch())
    width = {"none": 512, "mlp": DIM, "projection": DIM, "linear": CLASSES}[reference]
    assert got.shape == (3, width)
    assert f"(batch, {width})" in result.output
    if reference == "mlp":
        assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-5)
    if fmt == "torchvision" and head == "mlp":
        assert "normalisation is not part of a state dict" in result.output


def test_safetensors_metadata_names_the_run_and_the_probe(run_v2, tmp_path):
    out = tmp_path / "linear.safetensors"
    assert export(run_v2.path, "--out", out, "--head", "linear").exit_code == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mauctl.export/1"
    assert (meta["arch"], meta["head"], meta["small_stem"], meta["mlp"]) == ("resnet18", "linear", "true", "false")
    assert (meta["dim"], meta["num_classes"]) == (str(CLASSES), str(CLASSES))
    assert meta["config_digest"] == config_digest(run_v2.config)
    assert float(meta["top1"]) == TOP1
    assert meta["source"] == str(run_v2.lincls)
    assert meta["mauctl_version"] == mauctl.__version__

    out = tmp_path / "features.safetensors"
    result = export(run_v2.checkpoint, "--out", out)
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert (meta["head"], meta["dim"], meta["top1"]) == ("none", "0", "")
    assert meta["config_digest"] == config_digest(run_v2.config)
    assert keys and not any(k.startswith("fc.") for k in keys)  # backbone keys only


def test_torchvision_state_dicts_load_strictly_into_stock_models(run_v1, tmp_path):
    linear, projection = tmp_path / "linear.pt", tmp_path / "projection.pt"
    assert export(run_v1.path, "--out", linear, "--format", "torchvision", "--head", "linear").exit_code == 0
    assert export(run_v1.path, "--out", projection, "--format", "torchvision", "--head", "mlp").exit_code == 0

    classifier = torchvision.models.resnet18(num_classes=CLASSES)
    classifier.load_state_dict(torch.load(linear, weights_only=True), strict=True)
    assert_same_outputs(classifier.eval(), run_v1.reference["linear"], batch())
    embedder = torchvision.models.resnet18(num_classes=DIM)
    embedder.load_state_dict(torch.load(projection, weights_only=True), strict=True)
    assert_same_outputs(lambda x: F.normalize(embedder.eval()(x), dim=1), run_v1.reference["mlp"], batch())
    # load_exported recognises a ResNet without being told the architecture
    assert_same_outputs(load_exported(linear), run_v1.reference["linear"], batch())


def test_original_moco_and_torchvision_checkpoints_export(tmp_path):
    torch.manual_seed(5)
    q = build_encoder("resnet18", 128, mlp=True)
    scramble(q, 5)
    k = copy.deepcopy(q)
    moco = tmp_path / "moco_v2_200ep.pth.tar"
    torch.save({"arch": "resnet18", "epoch": 200,
                "state_dict": {**{f"module.encoder_q.{n}": v for n, v in q.state_dict().items()},
                               **{f"module.encoder_k.{n}": v for n, v in k.state_dict().items()},
                               "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1)}}, moco)
    out = tmp_path / "moco.safetensors"
    result = export(moco, "--out", out, "--head", "mlp")
    assert result.exit_code == 0, result.output
    assert printed_diff(result.output) <= 1e-5
    q.eval()
    assert_same_outputs(load_exported(out), lambda x: F.normalize(q(x), dim=1), batch(224, 2))

    tv = torchvision.models.resnet18(num_classes=CLASSES)
    scramble(tv, 6)
    plain = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), plain)
    out = tmp_path / "tv.pt"
    result = export(plain, "--out", out, "--format", "torchscript")
    assert result.exit_code == 0, result.output
    tv.fc = nn.Identity()
    assert_same_outputs(read_back(out, "torchscript"), tv.eval(), batch(224, 2))


def test_torch_hub_loads_exports_offline(run_v2, run_v1, tmp_path):
    embedding = tmp_path / "embedding.safetensors"
    assert export(run_v2.path, "--out", embedding, "--head", "mlp").exit_code == 0
    model = torch.hub.load(str(REPO_ROOT), "encoder", source="local", path=str(embedding))
    assert not model.training
    assert_same_outputs(model, run_v2.reference["mlp"], batch())

    classifier = tmp_path / "classifier.pt"
    assert export(run_v1.path, "--out", classifier, "--format", "torchvision", "--head", "linear").exit_code == 0
    model = torch.hub.load(str(REPO_ROOT), "encoder", source="local", path=str(classifier), arch="resnet18")
    assert_same_outputs(model, run_v1.reference["linear"], batch())


# ---------------------------------------------------------------- the check catches a wrong file


def test_a_file_that_reads_back_differently_is_not_kept(run_v2, tmp_path, monkeypatch):
    original = mauctl.export.reload

    def perturbed(path, fmt, arch):
        model = original(path, fmt, arch)
        with torch.no_grad():
            next(model.parameters()).add_(0.05)
        return model

    monkeypatch.setattr(mauctl.export, "reload", perturbed)
    out = tmp_path / "encoder.safetensors"
    result = export(run_v2.path, "--out", out)
    assert result.exit_code == 1, result.output
    assert "max abs diff" in result.output and "nothing was written" in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # nor a temporary file

    out.write_bytes(b"the user's earlier export")
    result = export(run_v2.path, "--out", out, "--force", "--format", "torchscript")
    assert result.exit_code == 1, result.output
    assert out.read_bytes() == b"the user's earlier export"  # a failed export replaces nothing
    assert list(tmp_path.iterdir()) == [out]


def test_an_exporter_that_fails_leaves_nothing(run_v2, tmp_path, monkeypatch):
    def trace(*args, **kwargs):
        raise RuntimeError("Tracer cannot infer type of output")

    monkeypatch.setattr(torch.jit, "trace", trace)
    out = tmp_path / "encoder.ts"
    result = export(run_v2.path, "--out", out, "--format", "torchscript")
    assert result.exit_code == 1, result.output
    assert "writing the torchscript file failed" in result.output and "Tracer cannot infer" in result.output
    assert "--format safetensors" in result.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- refusals


def refused(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def test_torchvision_format_only_for_stock_models(run_v1, run_v2, tmp_path):
    out = tmp_path / "x.pt"
    refused(export(run_v2.path, "--out", out, "--format", "torchvision", "--head", "mlp"),
            "2-layer MLP", "--format safetensors")
    refused(export(run_v1.path, "--out", out, "--format", "torchvision"), "--head none", "Identity")
    refused(export(run_v2.path, "--out", out, "--format", "torchvision", "--head", "linear"), "small_stem")
    assert not out.exists()


def test_onnx_needs_the_onnx_extra(run_v2, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    out = tmp_path / "x.onnx"
    refused(export(run_v2.path, "--out", out, "--format", "onnx"), "pip install 'mauctl[onnx]'")
    assert not out.exists()


def test_an_existing_file_is_replaced_only_with_force(run_v2, tmp_path):
    out = tmp_path / "encoder.safetensors"
    out.write_bytes(b"precious")
    refused(export(run_v2.path, "--out", out), str(out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    result = export(run_v2.path, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert_same_outputs(load_exported(out), run_v2.reference["none"], batch())


def test_bad_values_and_sources_are_named(run_v2, tmp_path):
    out = tmp_path / "x"
    refused(export(run_v2.path, "--out", out, "--format", "tflite"), "--format 'tflite'", "safetensors")
    refused(export(run_v2.path, "--out", out, "--head", "mpl"), "--head 'mpl'", "did you mean 'mlp'")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    refused(export(notes, "--out", out), str(notes))
    refused(export(tmp_path / "missing", "--out", out), "no such file")
    refused(export(run_v2.lincls, "--out", out, "--head", "mlp"), "linear-probe checkpoint", "--head mlp")
    refused(export(run_v2.path, "--out", out, "--lincls", "other"), "--lincls other", "lincls")
    refused(export(run_v2.checkpoint, "--out", run_v2.checkpoint, "--force"), "is the checkpoint being exported")
    assert read_encoder(run_v2.checkpoint).source == "mauctl"  # untouched
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--format", "pickle", "--format 'pickle': expected one of safetensors, torchvision, torchscript, onnx"),
    ("--format", "ONXX", ("--format 'ONXX': expected one of safetensors, torchvision, torchscript, onnx; "
                          "did you mean 'onnx'?")),
    ("--head", "mpl", "--head 'mpl': expected one of none, mlp, linear; did you mean 'mlp'?"),
])
def test_an_unknown_choice_lists_the_valid_ones_once(tmp_path, flag, value, message):
    # the choice is checked before the source is read: no run needed
    result = export(tmp_path / "run", "--out", tmp_path / "x", flag, value)
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {message}\n"
    assert not (tmp_path / "x").exists()


def test_head_linear_picks_the_only_probe_or_asks(tmp_path):
    run = make_run(tmp_path / "run", mlp=False, small_stem=True, seed=2)
    second = run.path / "lincls" / "lincls-long" / "best.pt"
    second.parent.mkdir()
    second.write_bytes(run.lincls.read_bytes())
    out = tmp_path / "x.safetensors"
    refused(export(run.path, "--out", out, "--head", "linear"), "2 linear-probe results", "lincls, lincls-long",
            "--lincls NAME")
    result = export(run.path, "--out", out, "--lincls", "lincls-long")
    assert result.exit_code == 0, result.output
    assert "91.50" in result.output  # the probe's top-1

    bare = make_run(tmp_path / "bare", mlp=False, small_stem=True, seed=3)
    for probe in (bare.path / "lincls").rglob("*"):
        if probe.is_file():
            probe.unlink()
    refused(export(bare.path, "--out", tmp_path / "y", "--head", "linear"), "no linear-probe result",
            "mauctl lincls")
