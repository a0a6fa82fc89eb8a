"""The collapse guard: q_std, the detector's count, the likely causes it names, and a run that really
collapses (alignment only, at a huge LR), warns in its first epoch and stops under run.stop_on_collapse."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console

from conftest import TINY, run_mauctl
from mauctl.config import config_digest, load_config
from mauctl.engine.checkpoint import TrainState
from mauctl.collapse import CollapseDetector, CollapseGuard, embedding_std, likely_causes
from mauctl.engine.progress import MetricsLog, Reporter
from mauctl.engine.rundir import RunDir
from mauctl.errors import RunError


def pretrain_config(*sets: str, preset: str | None = None, loss: str | None = None):
    return load_config("pretrain", preset=preset, loss=loss, sets=sets, environ={}).config


def test_q_std_is_one_over_sqrt_d_when_the_embeddings_spread_and_near_zero_when_they_collapse():
    torch.manual_seed(0)
    d = 128
    spread = torch.nn.functional.normalize(torch.randn(4096, d), dim=1)
    assert embedding_std(spread).item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    one_point = torch.nn.functional.normalize(spread[:1] + 1e-3 * torch.randn(4096, d), dim=1)
    assert embedding_std(one_point).item() == pytest.approx(1e-3, rel=0.05)  # the noise around the point
    on_a_line = torch.nn.functional.normalize(torch.randn(4096, 1) * torch.eye(d)[:1] + 1e-6, dim=1)
    assert embedding_std(on_a_line).item() < 0.1 / math.sqrt(d)  # two antipodal points: a collapse too


def test_the_detector_reports_once_after_three_low_logging_steps_in_a_row_and_again_after_a_recovery():
    detector = CollapseDetector(dim=64)
    assert detector.threshold == pytest.approx(0.1 / 8)
    low, high = 0.5 * detector.threshold, 2 * detector.threshold
    assert [detector.update(v) for v in (low, low, high)] == [False] * 3  # a dip that recovers
    assert [detector.update(v) for v in (low, low, low, low)] == [False, False, True, False]  # once, at the 3rd
    assert detector.update(detector.threshold) is False  # at the threshold is not below it: the count restarts
    assert [detector.update(v) for v in (low, low, low)] == [False, False, True]
    detector = CollapseDetector(dim=64, fraction=0.5, patience=1)
    assert detector.update(0.4 / 8) is True


def test_the_likely_causes_come_from_the_config_the_preset_and_the_dataset_size():
    # the run that collapsed silently: preset v2-b128 at --batch-size 16, 150 images, queue 65536
    cfg = pretrain_config("optim.batch_size=16", preset="v2-b128")
    causes = likely_causes(cfg, 150, "v2-b128")
    assert causes == (
        "optim.lr 0.03 at batch 16 is 8x preset v2-b128's LR per image (0.03 at batch 128; --lr 0.00375 keeps that); "
        "model.queue_size 65536 is 437x the 150 training images (L_uniform barely pushes apart until its random "
        "initial keys are replaced, in about 455 epochs; --set model.queue_size=144 fits)")
    assert "only the alignment loss is on" in likely_causes(
        pretrain_config("loss.unif_w=0", "loss.contr_w=0", "loss.align_w=1"), 10**6, None)
    assert "loss.align_w 10 is 10x loss.unif_w, above the published columns' 4x" in likely_causes(
        pretrain_config("loss.align_w=10"), 10**6, None)
    # the preset's own settings on a big enough dataset: nothing stands out but the LR
    assert likely_causes(pretrain_config(preset="v2-b128"), 126689, "v2-b128") == (
        "optim.lr 0.03 may be too high for this data (try half of it)")
    assert likely_causes(pretrain_config(), 10**6, "a-preset-that-is-gone").startswith("optim.lr 0.03 may be")


def test_stop_on_collapse_is_not_in_the_digest():
    assert config_digest(pretrain_config("run.stop_on_collapse=true")) == config_digest(pretrain_config())


def test_the_guard_warns_with_a_record_and_under_stop_on_collapse_fails_the_run(tmp_path):
    run = RunDir(tmp_path)
    text = io.StringIO()
    reporter = Reporter(True, "pretrain", MetricsLog(run.metrics), 10,
                        console=Console(file=text, width=80, color_system=None))
    cfg = pretrain_config("model.dim=100", "loss.unif_w=0", "loss.align_w=1")
    state = TrainState(epoch=0, step_in_epoch=3, global_step=3)
    guard = CollapseGuard(cfg, reporter, run, 48, None)
    for q_std in (0.002, 0.003, 0.004):
        guard.check({"loss": 1.0, "q_std": q_std}, state)
    reporter.close()
    assert " ".join(text.getvalue().split()) == (
        "WARNING: collapse at epoch 1, step 3: the embeddings are close to one point (q_std below 0.01 for 3 "
        "logging steps, now 0.004; about 0.1 when they spread). Likely causes: only the alignment loss is on "
        "(loss.unif_w = loss.contr_w = 0): nothing keeps the embeddings apart. Training goes on; "
        "run.stop_on_collapse = true stops such a run.")
    (record,) = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert record["kind"] == "warning" and record["what"] == "collapse" and record["stopped"] is False
    assert (record["epoch"], record["step"], record["step_in_epoch"], record["q_std"]) == (0, 3, 3, 0.004)

    cfg.run.stop_on_collapse = True
    guard = CollapseGuard(cfg, Reporter(False, "pretrain", None, 10), run, 48, None)
    guard.check({"q_std": 0.001}, state)
    guard.check({"q_std": 0.001}, state)
    with pytest.raises(RunError, match=r"^collapse at epoch 1, step 3: .*; training stopped, the last checkpoint"):
        guard.check({"q_std": 0.001}, state)
    assert run.read_status()["state"] == "failed" and run.read_status()["reason"] == "collapse"


@pytest.mark.slow
def test_an_alignment_only_run_at_a_huge_lr_warns_in_its_first_epoch_and_stops_under_stop_on_collapse(
        tiny_images, tmp_path):
    run = tmp_path / "run"
    # 6 steps an epoch, each one logged; only the alignment term, at 30x the default LR
    args = ["pretrain", str(tiny_images), *TINY, "--batch-size", "8", "--out", str(run), "--set", "eval.every=0",
            "--set", "loss.contr_w=0", "--set", "loss.unif_w=0", "--set", "loss.align_w=1", "--lr", "1"]
    first = run_mauctl(*args, "--epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (warning,) = [r for r in records if r["kind"] == "warning"]
    assert warning["what"] == "collapse" and warning["epoch"] == 0 and warning["step_in_epoch"] <= 6
    assert warning["q_std"] < 0.1 / math.sqrt(32) == pytest.approx(warning["threshold"])
    assert f"WARNING: collapse at epoch 1, step {warning['step_in_epoch']}:" in first.stdout
    assert "Likely causes: only the alignment loss is on" in first.stdout
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[0]["q_std"] > 0.5 / math.sqrt(32)  # spread at the start

    # the same run, two processes, told to stop on a collapse (a change a resume allows), one epoch more:
    # it resumes, collapses again, and every rank stops; the epoch-1 checkpoint is kept
    second = run_mauctl(*args, "--epochs", "2", "--nproc-per-node", "2", "--set", "run.stop_on_collapse=true",
                        cwd=tmp_path)
    output = second.stdout + second.stderr
    assert second.returncode == 1, output
    assert "resuming from" in output and "Traceback" not in output
    for rank in (0, 1):
        assert f"rank {rank}: collapse at epoch 2, step 3:" in output
    assert "training stopped, the last checkpoint is kept" in output
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == "collapse"
    assert (status["epoch"], status["step_in_epoch"]) == (1, 3)
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 6)
    stop = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert stop["kind"] == "warning" and stop["stopped"] is True and stop["epoch"] == 1
