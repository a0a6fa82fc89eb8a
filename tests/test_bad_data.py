"""Bad data: image folders with damaged files, odd image modes, and class layouts a run cannot use.

Undecodable images are replaced by the next image that decodes (batches keep their shape, runs
their determinism) and counted per epoch; above ``data.max_bad_fraction`` the run stops with the
list of files (exit 1). Class layouts that cannot work are refused before any worker starts (exit 2).

The training runs here are in-process workers (RANK=0, WORLD_SIZE=1: the CLI runs the job itself,
as under a user's own torchrun), so they take seconds; the two-process run is marked slow.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import run_mauctl, write_image_folder
from mauctl import cli
from mauctl.backbone import build_encoder
from mauctl.config import PretrainConfig
from mauctl.data import loader
from mauctl.data.augment import eval_transform, lincls_train_transform
from mauctl.data.folder import scan_split
from mauctl.data.loader import BadImages, EpochSampler, SeededImages, make_loader
from mauctl.errors import RunError

# Other sessions may add representation diagnostics to pretraining; these tests do not need them.
NO_EVAL = ["--set", "eval.every=0"] if "eval" in PretrainConfig.model_fields else []
# Smaller still than conftest's TINY: 16 px, batches of 8.
SMALL = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--set", "model.queue_size=32",
         "--set", "model.dim=16", "--workers", "0", "--set", "run.print_freq=1", "--seed", "3", *NO_EVAL]
PROBE = ["--epochs", "1", "--batch-size", "8", "--lr", "0.1", "--workers", "0", "--image-size", "16",
         "--set", "run.print_freq=1"]


# ---------------------------------------------------------------- files


def jpeg_bytes(size: int = 24, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A 100 000 x 100 000 PNG header (10^10 pixels) and no pixel data: a decompression bomb, in 57 bytes."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


BAD_FILES = {  # kind -> (file name, bytes, what the report says)
    "truncated-jpeg": ("truncated.jpg", jpeg_bytes()[:300], "truncated file"),
    "zero-bytes": ("empty.jpg", b"", "empty file"),
    "not-an-image": ("notes.png", b"shopping list: eggs, milk\n", "not an image file"),
    "decompression-bomb": ("huge.png", bomb_png(), "too large to decode safely"),
    "deleted-after-scan": ("gone.jpg", jpeg_bytes(), "deleted since the folder was scanned"),
}


def add_bad_image(folder: Path, kind: str) -> Path:
    name, data, _ = BAD_FILES[kind]
    path = folder / name
    path.write_bytes(data)
    return path


def delete_if_needed(path: Path, kind: str) -> None:
    if kind == "deleted-after-scan":
        path.unlink()


# ---------------------------------------------------------------- decoding and substitution


def test_every_decodable_mode_is_served_as_an_rgb_tensor(tmp_path):
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    rgb = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype("uint8"))
    wide = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(wide).save(folder / "sixteen-bit.png")  # 'I;16'
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("LA").save(folder / "grey-alpha.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("P").save(folder / "palette.gif")
    rgb.convert("1").save(folder / "bilevel.bmp")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255).save(folder / "float.tif")  # 'F'
    samples = scan_split(tmp_path, "train").samples
    dataset = SeededImages(samples, eval_transform(16), report_skipped=True)
    for index, (path, _) in enumerate(samples):
        x, _, skipped = dataset[(index, 0)]
        assert skipped == (), path
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all(), path


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_an_undecodable_image_is_replaced_by_the_next_one_and_reported(kind, tmp_path):
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    bad = add_bad_image(folder, kind)
    (folder / "z.jpg").write_bytes(jpeg_bytes(seed=2))
    samples = scan_split(tmp_path, "train").samples
    delete_if_needed(bad, kind)
    where = [p for p, _ in samples].index(str(bad))
    dataset = SeededImages(samples, lincls_train_transform(16), report_skipped=True)

    x, label, skipped = dataset[(where, 1234)]
    x_next, label_next, nothing = dataset[(where + 1, 1234)]
    assert torch.equal(x, x_next) and label == label_next and nothing == ()  # the next image, the same seed
    assert [p for p, _ in skipped] == [str(bad)]
    assert BAD_FILES[kind][2] in skipped[0][1]
    x_plain, _ = SeededImages(samples, lincls_train_transform(16))[(where, 1234)]  # without the report
    assert torch.equal(x_plain, x)


def test_a_run_of_bad_images_gets_a_blank_stand_in_and_reports_them_all(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "MAX_TRIES", 3)
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(b"")
    samples = scan_split(tmp_path, "train").samples
    x, label, skipped = SeededImages(samples, eval_transform(8), report_skipped=True)[(0, 0)]
    assert x.shape == (3, 8, 8) and label == 0
    assert [p for p, _ in skipped] == [p for p, _ in samples[:3]]


def test_reports_cross_loader_workers_and_batches_keep_their_shape(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=6, size=(16, 16))
    add_bad_image(tmp_path / "train" / "c0", "truncated-jpeg")
    add_bad_image(tmp_path / "train" / "c1", "not-an-image")
    index = scan_split(tmp_path, "train")
    dataset = SeededImages(index.samples, eval_transform(16), report_skipped=True)

    def epoch(workers: int) -> tuple[list[torch.Tensor], set[str]]:
        sampler = EpochSampler(len(dataset), 7, rank=0, world_size=1, seed=5)
        batches, seen = [], set()
        for x, y, skipped in make_loader(dataset, sampler, workers, pin_memory=False):
            assert x.shape == (7, 3, 16, 16) and y.shape == (7,)
            assert all(0 <= row < 7 for row in skipped)
            seen |= {path for pairs in skipped.values() for path, _ in pairs}
            batches.append(x)
        return batches, seen

    in_process, seen = epoch(0)
    in_workers, seen_by_workers = epoch(2)
    assert seen == seen_by_workers == {str(tmp_path / "train/c0/truncated.jpg"), str(tmp_path / "train/c1/notes.png")}
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers, strict=True))


class OneProcess:
    distributed, world_size, rank = False, 1, 0


def test_bad_images_are_counted_once_per_epoch_and_stop_the_run_above_the_limit(tmp_path):
    bad = BadImages(tmp_path / "train", total=1000, max_fraction=0.03, runtime=OneProcess())
    bad.add({0: (("a.jpg", "empty file"),), 5: (("a.jpg", "empty file"), ("b.jpg", "not an image file"))})
    bad.add({})
    assert bad.agree() == 2 and bad.shown() == {"bad_images": 2}
    bad.add({row: ((f"{row:02d}.jpg", "empty file"),) for row in range(28)})
    assert bad.agree() == 30  # 3% of 1000 is still allowed
    bad.add({0: (("last straw.jpg", "truncated"),)})
    with pytest.raises(RunError) as refused:
        bad.agree()
    message = refused.value.message
    assert message.startswith(f"31 of the 1000 images in {tmp_path / 'train'} could not be decoded this epoch")
    assert "data.max_bad_fraction = 0.03" in message and "  00.jpg: empty file" in message
    assert "and 11 more" in message and len(message.splitlines()) == 1 + 20 + 1
    assert "--set data.max_bad_fraction=0.05" in refused.value.hint
    bad.reset()
    assert bad.agree() == 0 and bad.shown() == {}


# ---------------------------------------------------------------- runs


@pytest.fixture
def worker_env(monkeypatch):
    """The CLI runs the job in this process, as a worker of a one-process torchrun would."""
    for name in list(os.environ):
        if name.startswith("MAUCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setitem(cli._debug, "on", False)
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def invoke(*args, env=None):
    return CliRunner().invoke(cli.app, [str(a) for a in args], env=env)


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@pytest.fixture
def damaged(tmp_path) -> tuple[Path, list[Path]]:
    """2 classes x 7 good JPEGs and 2 bad ones in train/ (16: two batches of 8), 2 x 3 good and 1 bad in val/."""
    data = write_image_folder(tmp_path / "data", classes=2, per_class=7, size=(20, 20))
    write_image_folder(data, classes=2, per_class=3, size=(20, 20), split="val", seed=1)
    bad = [add_bad_image(data / "train" / "c0", "truncated-jpeg"), add_bad_image(data / "train" / "c1", "zero-bytes"),
           add_bad_image(data / "val" / "c1", "not-an-image")]
    return data, bad


def test_pretraining_skips_bad_images_and_counts_them_per_epoch(damaged, tmp_path, worker_env):
    data, bad = damaged
    run = tmp_path / "run"
    result = invoke("pretrain", data, *SMALL, "--epochs", "1", "--out", run,
                    "--set", "data.max_bad_fraction=0.2", env=worker_env)  # 2 of 16 images: 12.5%
    assert result.exit_code == 0, result.output
    assert [r["bad_images"] for r in records(run, "epoch")] == [2]
    assert records(run, "step")[-1]["bad_images"] == 2
    assert "bad_images 2" in result.output  # the progress lines
    assert (run / "checkpoints" / "last.pt").exists()


def test_pretraining_stops_with_the_list_of_bad_files_above_the_limit(damaged, tmp_path, worker_env):
    data, bad = damaged
    run = tmp_path / "run"
    result = invoke("pretrain", data, *SMALL, "--epochs", "1", "--out", run, "--set", "run.print_freq=100",
                    env=worker_env)  # checked at the end of the epoch, when both bad images were met
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "2 of the 16 images" in result.stderr and "data.max_bad_fraction = 0.001" in result.stderr
    assert f"{bad[0]}: truncated file" in result.stderr
    assert f"{bad[1]}: empty file" in result.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert not (run / "checkpoints" / "last.pt").exists()  # stopped before the end-of-epoch checkpoint


def torchvision_weights(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(build_encoder("resnet18", 10).state_dict(), path)
    return path


@pytest.mark.parametrize("cached", [False, True], ids=["per-epoch", "cached-features"])
def test_the_probe_skips_bad_images_in_train_and_val(cached, damaged, tmp_path, worker_env):
    data, bad = damaged
    out = tmp_path / "probe"
    result = invoke("lincls", torchvision_weights(tmp_path / "rn18.pt"), data, *PROBE, "--out", out,
                    "--set", "data.max_bad_fraction=0.2", "--set", f"lincls.cached_features={str(cached).lower()}",
                    env=worker_env)
    assert result.exit_code == 0, result.output
    (epoch,) = records(out, "epoch")
    assert epoch["bad_images"] == 2 and epoch["val_bad_images"] == 1
    top1 = json.loads((out / "results.json").read_text())["top1"]
    correct = top1 * 6 / 100  # the bad val image does not count: accuracy over the 6 good ones
    assert correct == pytest.approx(round(correct), abs=1e-6)


def test_the_probe_stops_on_bad_val_images_above_the_limit(damaged, tmp_path, worker_env):
    data, bad = damaged
    result = invoke("lincls", torchvision_weights(tmp_path / "rn18.pt"), data, *PROBE, "--out", tmp_path / "probe",
                    "--set", "data.max_bad_fraction=0.13", env=worker_env)  # train 2/16 passes, val 1/7 does not
    assert result.exit_code == 1, result.output
    assert f"1 of the 7 images in {data / 'val'}" in result.stderr
    assert f"{bad[2]}: not an image file Pillow can read" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_two_processes_stop_on_the_bad_images_both_ranks_met(damaged, tmp_path):
    data, bad = damaged
    paths = [path for path, _ in scan_split(data, "train").samples]
    met_by = {rank for rank in (0, 1) for index, _ in EpochSampler(len(paths), 8, rank, 2, seed=3)
              if paths[index] in (str(bad[0]), str(bad[1]))}
    assert met_by == {0, 1}  # with seed 3, each rank meets one of the two bad images
    result = run_mauctl("pretrain", str(data), *SMALL, "--epochs", "1", "--nproc-per-node", "2",
                        "--set", "run.print_freq=100", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "2 of the 16 images" in result.stderr  # counted over both ranks
    assert str(bad[0]) in result.stderr and str(bad[1]) in result.stderr


# ---------------------------------------------------------------- refused before any worker starts


@pytest.fixture
def no_launch(monkeypatch):
    def launch(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr("mauctl.worker.start", launch)
    monkeypatch.setitem(cli._debug, "on", False)


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.mark.parametrize("command", ["pretrain", "lincls"])
def test_a_train_folder_with_one_class_is_refused(command, tmp_path, monkeypatch, no_launch):
    data = write_image_folder(tmp_path / "data", classes=1, per_class=20, size=(16, 16))
    write_image_folder(data, classes=1, per_class=2, size=(16, 16), split="val")
    monkeypatch.chdir(tmp_path)
    if command == "pretrain":
        result, why, files = invoke("pretrain", data, *SMALL), "DATA points one level too deep", ["data"]
    else:
        weights = torchvision_weights(tmp_path / "rn18.pt")
        result, why, files = invoke("lincls", weights, data, *PROBE), "nothing to tell apart", ["data", "rn18.pt"]
    refused(result, f"{data / 'train'} holds a single class folder ('c0')", why)
    assert sorted(p.name for p in tmp_path.iterdir()) == files


def test_pretraining_refuses_a_val_folder_with_other_classes(tmp_path, monkeypatch, no_launch):
    data = write_image_folder(tmp_path / "data", classes=3, per_class=8, size=(16, 16))
    write_image_folder(data, classes=2, per_class=2, size=(16, 16), split="val")
    monkeypatch.chdir(tmp_path)
    refused(invoke("pretrain", data, *SMALL), "train/ and val/ have different classes", "only in train: c2",
            "pretraining reads only train/")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_an_empty_val_class_is_refused_by_the_probe(tmp_path, monkeypatch, no_launch):
    data = write_image_folder(tmp_path / "data", classes=2, per_class=8, size=(16, 16))
    write_image_folder(data, classes=2, per_class=2, size=(16, 16), split="val")
    for image in (data / "val" / "c1").iterdir():
        image.unlink()
    monkeypatch.chdir(tmp_path)
    refused(invoke("lincls", torchvision_weights(tmp_path / "rn18.pt"), data, *PROBE),
            f"{data / 'val'}: 1 class folder without images: c1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "rn18.pt"]
