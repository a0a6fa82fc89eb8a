"""`mauctl lincls`: the frozen-backbone linear probe on real folders, from every accepted checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, mauctl_env, run_mauctl, write_image_folder
from mauctl.backbone import build_encoder
from mauctl.errors import RunError
from mauctl.lincls import check_frozen, frozen_with_new_classifier, keep_rows
from mauctl.weights import read_encoder

HERE = Path(__file__).parent
PROBE = ["--epochs", "2", "--batch-size", "16", "--lr", "0.1", "--workers", "0", "--set", "run.print_freq=1"]


def moco_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """An original MoCo checkpoint: {'arch', 'epoch', 'state_dict': {'module.encoder_q.*', ...}}."""
    torch.manual_seed(seed)
    encoder = build_encoder("resnet18", 32, mlp=True)
    q = encoder.state_dict()
    state = {f"module.encoder_q.{k}": v for k, v in q.items()}
    state.update({f"module.encoder_k.{k}": v.clone() for k, v in q.items()})
    state["module.queue"] = torch.randn(32, 64)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"arch": "resnet18", "epoch": 200, "state_dict": state}, path)
    return q


def test_probe_of_an_original_moco_checkpoint_keeps_its_backbone_and_writes_results(tiny_images, tmp_path):
    q = moco_checkpoint(tmp_path / "checkpoint_0199.pth.tar")
    out = tmp_path / "probe"
    result = run_mauctl("lincls", str(tmp_path / "checkpoint_0199.pth.tar"), str(tiny_images), "--image-size", "32",
                        *PROBE, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "mauctl.lincls-results/1" and results["finished"]
    assert results["epochs_done"] == 2 and len(results["history"]) == 2
    assert results["best_top1"] == max(h["top1"] for h in results["history"])
    assert results["protocol"]["dataset"]["classes"] == 3 and results["protocol"]["dataset"]["val_images"] == 12
    assert results["protocol"]["crop_scale"] == 0.08  # main_lincls's RandomResizedCrop, recorded for report
    assert results["protocol"]["flip"] is True
    assert results["pretrain"]["source"] == "moco" and results["pretrain"]["arch"] == "resnet18"
    assert results["protocol"]["kind"] == "per-epoch" and results["protocol"]["lr"] == 0.1

    best = torch.load(out / "best.pt", weights_only=True)
    for key, value in q.items():
        if not key.startswith("fc."):
            assert torch.equal(best["model"][key], value), key  # frozen: BN statistics included
    assert best["model"]["fc.weight"].shape == (3, 512)


def test_probe_of_a_mauctl_run_uses_its_data_and_image_size(tiny_images, tmp_path):
    run = tmp_path / "run"
    assert run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(run),
                      cwd=tmp_path).returncode == 0
    result = run_mauctl("lincls", str(run), *PROBE, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    probe = run / "lincls" / "lincls"
    results = json.loads((probe / "results.json").read_text())
    assert results["protocol"]["image_size"] == 32
    assert Path(results["protocol"]["dataset"]["root"]) == tiny_images.resolve()
    assert results["pretrain"]["source"] == "mauctl" and results["pretrain"]["config_digest"]
    assert "image_size = 32" in (probe / "config.toml").read_text()

    evaluated = run_mauctl("lincls", str(run), "--evaluate", "--workers", "0", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    top1 = json.loads((probe / "evaluate.json").read_text())["top1"]
    assert top1 == pytest.approx(results["best_top1"])


def test_two_processes_count_every_val_image_once(tiny_images, tmp_path):
    moco_checkpoint(tmp_path / "moco.pt")
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["lincls", str(tmp_path / "moco.pt"), str(tiny_images), "--image-size", "32", *PROBE, "--epochs", "1"]
    assert run_mauctl(*common, "--out", str(one), cwd=tmp_path).returncode == 0
    result = run_mauctl(*common, "--out", str(two), "--nproc-per-node", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    # the same global batches and the same loss: the same classifier, evaluated on all 12 images
    assert b["top1"] == pytest.approx(a["top1"], abs=1e-6)
    assert b["top1"] * 12 / 100 == pytest.approx(round(b["top1"] * 12 / 100), abs=1e-6)


def test_a_failed_checkpoint_write_stops_both_processes_and_keeps_the_last_epoch(tiny_images, tmp_path):
    moco_checkpoint(tmp_path / "moco.pt")
    out = tmp_path / "probe"
    # rank 0's second checkpoint write (after epoch 2) fails as on a full disk (test hook): the probe
    # stops with the reason, and the first epoch's checkpoint is still there, whole
    result = run_mauctl("lincls", str(tmp_path / "moco.pt"), str(tiny_images), "--image-size", "32", *PROBE,
                        "--epochs", "3", "--out", str(out), "--nproc-per-node", "2", cwd=tmp_path, timeout=120,
                        MAUCTL_TEST_FAIL_SAVE="2:ENOSPC")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "could not write the checkpoint" in output and "No space left on device" in output
    assert "Traceback" not in output
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1  # the first epoch's, whole
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def test_a_probe_killed_within_an_epoch_resumes_from_its_timed_checkpoint_as_if_never_stopped(
        tiny_images, tmp_path):
    moco_checkpoint(tmp_path / "moco.pt")
    # 3 steps per epoch; run.save_minutes tiny: last.pt is written at every logging step as well
    args = ["lincls", str(tmp_path / "moco.pt"), str(tiny_images), "--image-size", "32", *PROBE,
            "--set", "run.save_minutes=0.00001"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_mauctl(*args, "--out", str(whole), cwd=tmp_path).returncode == 0

    # writes: epoch 1 after steps 1 and 2 and at its end, epoch 2 after step 1, then the 5th (after
    # step 2) SIGKILLs the process half-way through (test hook)
    crashed = run_mauctl(*args, "--out", str(killed), cwd=tmp_path, MAUCTL_TEST_FAIL_SAVE="5:kill")
    assert crashed.returncode != 0
    saved = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 1)

    resumed = run_mauctl(*args, "--out", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout and "removed 1 partial file left in" in resumed.stdout
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (whole, killed))
    assert (b["epoch"], b["global_step"]) == (a["epoch"], a["global_step"]) == (2, 6)
    for name in ("fc.weight", "fc.bias"):
        assert torch.equal(a["model"][name], b["model"][name]), name
    history = [json.loads((d / "results.json").read_text())["history"] for d in (whole, killed)]
    assert [(h["top1"], h["train_loss"]) for h in history[0]] == [(h["top1"], h["train_loss"]) for h in history[1]]


@pytest.mark.slow
def test_a_probe_resumes_in_fp16_after_an_fp32_epoch(tiny_images, tmp_path):
    moco_checkpoint(tmp_path / "moco.pt")
    out = tmp_path / "probe"
    args = ["lincls", str(tmp_path / "moco.pt"), str(tiny_images), "--image-size", "32", *PROBE,
            "--out", str(out)]
    assert run_mauctl(*args, "--epochs", "1", cwd=tmp_path).returncode == 0  # fp32 here: the scaler saves {}
    fp16 = run_mauctl(*args, "--set", "run.precision='fp16'", cwd=tmp_path)
    assert fp16.returncode == 0, fp16.stdout + fp16.stderr
    assert "resuming at epoch 2" in fp16.stdout
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["scaler"]["scale"] > 0


@pytest.mark.slow
def test_two_processes_cache_the_same_features_and_train_the_same_classifier(tiny_images, tmp_path):
    moco_checkpoint(tmp_path / "moco.pt")
    common = ["lincls", str(tmp_path / "moco.pt"), str(tiny_images), "--image-size", "32", *PROBE,
              "--set", "lincls.cached_features=true", "--set", "lincls.augmented_views=2"]
    for n in (1, 2):
        result = run_mauctl(*common, "--out", str(tmp_path / str(n)), "--nproc-per-node", str(n), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    one, two = (torch.load(tmp_path / str(n) / "checkpoints" / "last.pt", weights_only=True)["model"] for n in (1, 2))
    for name in ("fc.weight", "fc.bias"):  # each rank's rows gathered into place; convolutions batched differently
        assert torch.allclose(one[name], two[name], atol=1e-5), name


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux's peak RSS (VmHWM)")
@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_cached_features_are_held_once_while_they_are_extracted(processes, tmp_path):
    """Peak RSS growth of the extraction, 2 augmented views and val, within 1.2x the bytes of the features.

    Not the batches beside their concatenation, nor all rows beside the rows of decodable images, nor
    the views beside their stack, nor (on 2 ranks) the gathered shards beside the reassembled rows.
    """
    data = write_image_folder(tmp_path / "data", per_class=32, size=(16, 16))
    write_image_folder(data, per_class=4, size=(16, 16), split="val", seed=1)
    launch = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    # a fixed mmap threshold: glibc returns freed batches to the system at once instead of keeping
    # them in its heap, so the RSS follows the tensors alive
    result = subprocess.run([sys.executable, *launch, str(HERE / "cached_features_memory.py"), str(data),
                             str(tmp_path / "out"), "2"], env=mauctl_env(MALLOC_MMAP_THRESHOLD_="1048576"),
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in (tmp_path / "out").glob("memory-*.json")]
    assert len(ranks) == processes
    for rank in ranks:
        assert rank["features"] > 300e6  # what the ratio is measured against dominates the process
        assert rank["grown"] <= 1.2 * rank["features"], rank


def test_bad_rows_are_dropped_in_place_as_indexing_would_drop_them():
    rows = torch.randn(3, 10, 4)
    kept = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    expected = rows[:, kept]
    dropped = keep_rows(rows, kept, chunk=2)
    assert torch.equal(dropped, expected) and dropped.data_ptr() == rows.data_ptr()
    assert keep_rows(rows, torch.ones(10, dtype=torch.bool)) is rows


def test_the_frozen_backbone_check_catches_a_moved_weight(tmp_path):
    moco_checkpoint(tmp_path / "moco.pt")
    enc = read_encoder(tmp_path / "moco.pt")
    model = frozen_with_new_classifier(enc, 3)
    check_frozen(model, enc)  # untouched: passes
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(RunError, match="layer1.0.conv1.weight"):
        check_frozen(model, enc)
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] -= 1e-3
        model.bn1.running_mean += 0.1  # BatchNorm statistics count as weights too
    with pytest.raises(RunError, match="bn1.running_mean"):
        check_frozen(model, enc)


def test_only_the_classifier_trains():
    from mauctl.weights import Encoder

    state = build_encoder("resnet18", 8).state_dict()
    enc = Encoder("resnet18", False, False, 8, "fc", {k: v for k, v in state.items() if not k.startswith("fc.")},
                  {"weight": state["fc.weight"], "bias": state["fc.bias"]}, "torchvision", Path("x"))
    model = frozen_with_new_classifier(enc, 5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert model.fc.bias.abs().sum() == 0 and 0.005 < model.fc.weight.std() < 0.015  # N(0, 0.01), bias 0


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_checkpoint_that_would_run_code_is_refused(tiny_images, tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": RunsCode()}, f)
    result = run_mauctl("lincls", str(tmp_path / "evil.pt"), str(tiny_images), *PROBE, cwd=tmp_path)
    assert result.returncode == 2
    assert "run code" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "pwned.txt").exists()


def test_an_unknown_checkpoint_layout_is_refused_with_the_expected_keys(tiny_images, tmp_path):
    torch.save({"weights": torch.zeros(3), "notes": "mine"}, tmp_path / "other.pt")
    result = run_mauctl("lincls", str(tmp_path / "other.pt"), str(tiny_images), *PROBE, cwd=tmp_path)
    assert result.returncode == 2
    assert "module.encoder_q" in result.stderr and "notes, weights" in result.stderr


def test_train_and_val_with_different_classes_are_refused(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=3, per_class=8, size=(16, 16))
    write_image_folder(data, classes=2, per_class=2, size=(16, 16), split="val")
    moco_checkpoint(tmp_path / "moco.pt")
    result = run_mauctl("lincls", str(tmp_path / "moco.pt"), str(data), *PROBE, cwd=tmp_path)
    assert result.returncode == 2
    assert "different classes" in result.stderr and "c2" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_probe_config_and_writes_nothing(tiny_images, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mauctl.cli import app
    from mauctl.compat import tomllib

    moco_checkpoint(tmp_path / "moco.pt")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["lincls", "moco.pt", str(tiny_images), "--dry-run", "--image-size", "32",
                                      "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "encoder: resnet18 from moco.pt (moco)" in result.stdout
    assert ("# protocol: per-epoch, as in main_lincls.py: every epoch reads the images again; training views are "
            "random crops of 8% to 100% of the image, mirrored half the time; 3 steps per epoch; evaluated on the "
            "32-px centre crop of val/\n") in result.stdout
    assert "# LR schedule: 30, x0.1 from epoch 60, 80, 100 epochs\n" in result.stdout
    assert ("# checkpoints: last.pt after every epoch, every 30 minutes within one, and on a stop signal; "
            "best.pt at the best epoch\n") in result.stdout
    cached = CliRunner().invoke(app, ["lincls", "moco.pt", str(tiny_images), "--dry-run", "--image-size", "32",
                                      "--batch-size", "16", "--set", "lincls.cached_features=true",
                                      "--set", "lincls.augmented_views=2", "--set", "lincls.flip=false",
                                      "--set", "lincls.crop_scale=0.5"])
    assert ("# protocol: cached features of 2 training views per image, extracted once (report lists it apart); "
            "the views are random crops of 50% to 100% of the image, never mirrored; 3 steps per epoch; "
            "evaluated on the 32-px centre crop of val/\n") in cached.stdout
    config = tomllib.loads(result.stdout)
    assert config["optim"]["lr"] == 30.0 and config["optim"]["schedule"] == [60, 80]
    assert config["lincls"]["cached_features"] is False and config["data"]["image_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moco.pt"]
