"""Speed switches and `mauctl bench`: what they do on this CPU (their CUDA side is not run here)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import TINY, run_mauctl
from mauctl.config import load_config
from mauctl.engine import runtime
from mauctl.data.pipeline import TrainData
from mauctl.pretrain import Training
from mauctl.data.folder import scan_split

BENCH = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--set", "model.queue_size=64",
         "--set", "model.dim=32", "--workers", "0"]


def tiny_config(*sets: str):
    return load_config("pretrain", sets=["model.arch='resnet18'", "data.image_size=32", "optim.batch_size=16",
                                         "model.queue_size=64", "model.dim=32", "data.workers=0", *sets],
                       environ={}).config


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("'auto'", "auto")])
def test_compile_and_channels_last_take_true_false_or_auto(value, expected):
    config = tiny_config(f"run.compile={value}", f"run.channels_last={value}")
    assert config.run.compile == expected and config.run.channels_last == expected


def test_auto_speed_switches_stay_off_on_cpu():
    rt = runtime.Runtime(0, 1, 0, torch.device("cpu"), torch.float32, False)
    training = Training(tiny_config(), rt)
    assert not training.compiled and not training.channels_last
    group = training.optimizer.param_groups[0]
    assert group["foreach"] and not group.get("fused")  # one multi-tensor launch per op on CPU


def test_channels_last_gives_the_same_step_as_the_default_layout():
    rt = runtime.Runtime(0, 1, 0, torch.device("cpu"), torch.float32, False)
    g = torch.Generator().manual_seed(0)
    x_q, x_k = torch.randn(16, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)
    losses = []
    for layout in ("false", "true"):
        training = Training(tiny_config(f"run.channels_last={layout}"), rt)
        terms = training.step(x_q, x_k, torch.Generator().manual_seed(1), 1)
        losses.append(terms["loss"].item())
        if layout == "true":
            assert training.model.encoder_q.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_both_pipelines_give_batches_of_the_same_views(tiny_images):
    rt = runtime.Runtime(0, 1, 0, torch.device("cpu"), torch.float32, False)
    config = tiny_config("data.aug='v2'")
    index = scan_split(tiny_images, "train")
    batches = {p: next(TrainData(config, rt, index, p).batches(0)) for p in ("pil", "tensor")}
    for pil, tensor in zip(batches["pil"][:2], batches["tensor"][:2]):
        assert pil.shape == tensor.shape == (16, 3, 32, 32) and tensor.dtype == torch.float32
        # the same crops, flips and colour choices; only Pillow's 8-bit rounding differs (about 1 level / 255)
        assert (pil - tensor).abs().mean().item() < 0.05


@pytest.mark.slow
def test_fp16_on_cpu_trains_with_a_grad_scaler_kept_in_the_checkpoint(tiny_images, tmp_path):
    out = tmp_path / "run"
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(out),
                        "--set", "run.precision='fp16'", "--set", "data.pipeline='tensor'", "--set", "eval.every=0",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fp16" in result.stdout and "tensor data pipeline" in result.stdout
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0  # an enabled GradScaler's state, restored on resume


@pytest.mark.slow
def test_bench_measures_data_compute_and_end_to_end_for_both_pipelines(tiny_images, tmp_path):
    result = run_mauctl("bench", str(tiny_images), *BENCH, "--steps", "3", "--compare-pil", "--json",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "mauctl.bench/1" and report["device"] == "cpu" and report["images"] == 48
    rows = {(r["measure"], r["pipeline"]): r for r in report["results"]}
    assert set(rows) == {("compute", None), ("data", "pil"), ("end-to-end", "pil"), ("data", "tensor"),
                         ("end-to-end", "tensor")}
    compute = rows[("compute", None)]["images_per_s"]
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["steps"] == 3
        assert r["ratio"] == pytest.approx(r["images_per_s"] / compute)
    assert not list(tmp_path.iterdir())  # a benchmark writes nothing


def test_show_augmentations_writes_a_grid_and_never_overwrites(tiny_images, tmp_path):
    target = tmp_path / "views.png"
    result = run_mauctl("bench", str(tiny_images), *BENCH, "--show-augmentations", str(target), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with Image.open(target) as grid:
        assert grid.format == "PNG" and grid.width > grid.height  # PIL views beside tensor views
    again = run_mauctl("bench", str(tiny_images), *BENCH, "--show-augmentations", str(target), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_auto_loader_workers_are_this_process_share_of_the_cores(monkeypatch):
    from mauctl.data.loader import AUTO_WORKERS_MAX, worker_count

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert worker_count("auto") == AUTO_WORKERS_MAX == 8  # one process: at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert worker_count("auto") == 4  # 16 cores over 4 processes
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert worker_count("auto") == 1  # never 0 (that would load in the training process)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert worker_count("auto") == 2  # this 2-core machine: 2, not 8 (torch warned three times)
    assert worker_count(3) == 3 and worker_count(0) == 0  # a number is taken as it is
