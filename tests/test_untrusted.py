"""Untrusted files: checkpoints that would run code when unpickled, exports, and links in `subset`.

Every command that reads a checkpoint reads it with ``torch.load(weights_only=True)``: a file
holding a pickled callable is refused with a message, and the callable never runs (it would
create a marker file). `subset` never deletes or writes through a link that leads out of the
destination, and only reads through links in the source.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import write_image_folder
from mauctl import cli
from mauctl.backbone import build_encoder
from mauctl.config import PretrainConfig
from mauctl.export import load_exported

PACKAGE = Path(cli.__file__).parent
SMALL = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--set", "model.queue_size=32",
         "--set", "model.dim=16", "--workers", "0", "--seed", "3"]
NO_EVAL = ["--set", "eval.every=0"] if "eval" in PretrainConfig.model_fields else []
PROBE = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--image-size", "16"]


class RunsCode:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def write_evil(path: Path, marker: Path, layout: str) -> Path:
    """A checkpoint-looking file whose unpickling would run code: a raw pickle, or torch.save's zip."""
    payload = {"format": "mauctl.pretrain/1", "arch": "resnet18", "state_dict": RunsCode(marker)}
    if layout == "pickle":
        path.write_bytes(pickle.dumps(payload))  # protocol 4, which torch's safe loader stops at early
    else:
        torch.save(payload, path)
    return path


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An image folder (train/ and val/), cwd = tmp_path, the CLI in this process with --debug off."""
    for name in list(os.environ):
        if name.startswith("MAUCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setitem(cli._debug, "on", False)
    monkeypatch.chdir(tmp_path)
    data = write_image_folder(tmp_path / "data", classes=2, per_class=8, size=(16, 16))
    write_image_folder(data, classes=2, per_class=2, size=(16, 16), split="val")
    return tmp_path


def invoke(*args, env=None):
    return CliRunner().invoke(cli.app, [str(a) for a in args], env=env)


def evil_run_dir(root: Path, evil: Path) -> Path:
    """A pretraining run directory whose checkpoints/last.pt is ``evil``, configured as SMALL would be."""
    run = root / "run"
    dry = invoke("pretrain", root / "data", *SMALL, *NO_EVAL, "--epochs", "1", "--out", run, "--dry-run")
    assert dry.exit_code == 0, dry.output
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text(dry.stdout)
    os.replace(evil, run / "checkpoints" / "last.pt")
    return run


WORKER = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
# command line for each way a checkpoint is read; EVIL is the crafted file, RUN a run directory holding it
READERS = {
    "pretrain --resume PATH": (["pretrain", "data", *SMALL, *NO_EVAL, "--epochs", "1", "--resume", "EVIL",
                                "--out", "new"], 2, None),
    "pretrain resumes a run": (["pretrain", "data", *SMALL, *NO_EVAL, "--epochs", "1", "--out", "RUN"], 1, WORKER),
    "lincls CHECKPOINT": (["lincls", "EVIL", "data", *PROBE], 2, None),
    "lincls RUN": (["lincls", "RUN", *PROBE], 2, None),
    "lincls --resume PATH": (["lincls", "weights.pt", "data", *PROBE, "--resume", "EVIL", "--out", "probe"], 2, None),
    "export CHECKPOINT": (["export", "EVIL", "--out", "encoder.safetensors"], 2, None),
    "export RUN": (["export", "RUN", "--out", "encoder.safetensors"], 2, None),
}


@pytest.mark.parametrize("layout", ["pickle", "torch.save"])
@pytest.mark.parametrize("reader", list(READERS))
def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(reader, layout, workspace):
    marker = workspace / "pwned"
    evil = write_evil(workspace / "evil.pt", marker, layout)
    torch.save(build_encoder("resnet18", 10).state_dict(), workspace / "weights.pt")
    args, status, env = READERS[reader]
    run = evil_run_dir(workspace, evil) if "RUN" in args else None
    args = [str(run) if a == "RUN" else str(evil) if a == "EVIL" else a for a in args]
    before = sorted(workspace.rglob("*"))

    result = invoke(*args, env=env)

    assert result.exit_code == status, result.output
    assert "loading it would run code: it names posix.system" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert sorted(workspace.rglob("*")) == before  # no run directory, status, probe or export written


@pytest.mark.parametrize("layout", ["pickle", "torch.save"])
def test_loading_an_export_refuses_code_too(layout, tmp_path):
    evil = write_evil(tmp_path / "encoder.pt", tmp_path / "pwned", layout)
    with pytest.raises(Exception, match="loading it would run code"):
        load_exported(evil, arch="resnet18")  # what torch.hub.load(..., "encoder", path=...) calls
    assert not (tmp_path / "pwned").exists()


def test_report_reads_no_checkpoint(workspace):
    marker = workspace / "pwned"
    run = evil_run_dir(workspace, write_evil(workspace / "evil.pt", marker, "pickle"))
    (run / "lincls" / "probe").mkdir(parents=True)
    write_evil(run / "lincls" / "probe" / "best.pt", marker, "torch.save")
    result = invoke("report", workspace, "--format", "json")
    assert result.exit_code == 0, result.output
    assert not marker.exists()


def test_every_torch_load_in_mauctl_is_weights_only():
    calls = []
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert not re.search(r"\bpickle\.loads?\(|\bdill\b|\bjoblib\.load\(", text), source
        for match in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            calls.append((source.name, match.group(0)))
    assert calls, "no torch.load found: the pattern is stale"
    for name, call in calls:
        if "weights_only=True" not in call:  # a message that tells the user how to load an export
            assert "load_state_dict(torch.load(path, weights_only=True))" not in call, (name, call)
            pytest.fail(f"{name}: {call}")


def test_export_writes_safetensors_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr("mauctl.export.DEFAULT_IMAGE_SIZE", 32)  # a faster check: the format is the point here
    torch.save(build_encoder("resnet18", 10).state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "encoder.bin"  # a name that suggests no format
    result = invoke("export", tmp_path / "weights.pt", "--out", out)
    assert result.exit_code == 0, result.output
    header_length = int.from_bytes(out.read_bytes()[:8], "little")
    assert out.read_bytes()[8:9] == b"{" and header_length < out.stat().st_size  # safetensors: no pickle inside
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["arch"] == "resnet18" and f.metadata()["format"].startswith("mauctl")


# ---------------------------------------------------------------- subset and links

WNIDS = ["n00000001", "n00000002"]


def tiny_imagenet(root: Path) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, "JPEG")
    for split in ("train", "val"):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                (root / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(buffer.getvalue())
    (root / "classes.txt").write_text("\n".join(WNIDS) + "\n")
    return root


def outside_folder(root: Path) -> Path:
    """A folder of the user's, outside both trees, with a file that must survive."""
    folder = root / "mine"
    folder.mkdir()
    (folder / "keep.JPEG").write_bytes(b"not mauctl's to touch")
    return folder


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``, links not followed: link target, or type, size and bytes of files."""
    entries: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            if path.is_symlink():
                entries[str(path.relative_to(root))] = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                entries[str(path.relative_to(root))] = path.read_bytes()
            else:
                entries[str(path.relative_to(root))] = stat.S_IFMT(info.st_mode)
    return entries


def subset(source: Path, destination: Path, *args: str):
    return invoke("subset", source, destination, "--classes", source / "classes.txt", *args)


@pytest.mark.parametrize("link", ["hardlink", "copy"])
def test_a_destination_class_link_out_of_the_destination_is_never_written_through(link, tmp_path):
    source, mine = tiny_imagenet(tmp_path / "imagenet"), outside_folder(tmp_path)
    entry = tmp_path / "out" / "train" / WNIDS[0]
    entry.parent.mkdir(parents=True)
    entry.symlink_to(mine, target_is_directory=True)
    before = snapshot(mine)

    refused = subset(source, tmp_path / "out", "--link", link)
    assert refused.exit_code == 2, refused.output
    assert str(entry) in refused.output and "--force" in refused.output
    assert entry.is_symlink() and not (tmp_path / "out" / "val").exists()

    forced = subset(source, tmp_path / "out", "--link", link, "--force")
    assert forced.exit_code == 0, forced.output
    assert not entry.is_symlink() and entry.is_dir()  # the link itself was replaced by a real folder
    assert sorted(os.listdir(entry)) == sorted(os.listdir(source / "train" / WNIDS[0]))
    assert snapshot(mine) == before  # nothing written into, or deleted from, the user's folder


def test_a_file_link_inside_a_class_folder_is_replaced_not_written_through(tmp_path):
    source, mine = tiny_imagenet(tmp_path / "imagenet"), outside_folder(tmp_path)
    target = tmp_path / "out" / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    target.parent.mkdir(parents=True)
    target.symlink_to(mine / "keep.JPEG")
    before = snapshot(mine)

    refused = subset(source, tmp_path / "out", "--link", "copy")
    assert refused.exit_code == 2 and str(target) in refused.output, refused.output
    forced = subset(source, tmp_path / "out", "--link", "copy", "--force")
    assert forced.exit_code == 0, forced.output
    assert not target.is_symlink() and target.read_bytes() == (source / "train" / WNIDS[0] / target.name).read_bytes()
    assert snapshot(mine) == before


@pytest.mark.parametrize("link", ["symlink", "hardlink", "copy"])
def test_a_source_class_that_links_out_of_the_source_is_only_read(link, tmp_path):
    """ImageNet spread over several disks by links is common: reading through them is fine, writing is not."""
    source = tiny_imagenet(tmp_path / "imagenet")
    elsewhere = tmp_path / "other-disk" / WNIDS[1]
    os.renames(source / "train" / WNIDS[1], elsewhere)
    (source / "train" / WNIDS[1]).symlink_to(elsewhere, target_is_directory=True)
    before, source_before = snapshot(elsewhere.parent), snapshot(source)

    result = subset(source, tmp_path / "out", "--link", link, "--splits", "train")
    assert result.exit_code == 0, result.output
    built = tmp_path / "out" / "train" / WNIDS[1]
    if link == "symlink":
        assert os.readlink(built) == str(elsewhere.resolve())
    assert sorted(os.listdir(built)) == sorted(os.listdir(elsewhere))
    assert snapshot(elsewhere.parent) == before and snapshot(source) == source_before
    again = subset(source, tmp_path / "out", "--link", link, "--splits", "train")
    assert again.exit_code == 0 and snapshot(elsewhere.parent) == before  # a rerun is a no-op
