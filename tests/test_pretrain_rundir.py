"""Run directories and the ways into a run: resume rules, overwrite, the demo data, an outside torchrun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, mauctl_env, run_mauctl, start_mauctl

pytestmark = pytest.mark.slow


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def finished_run(tiny_images, tmp_path_factory) -> Path:
    """A finished one-epoch run, copied by the tests that change it."""
    where = tmp_path_factory.mktemp("finished")
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(where / "run"), cwd=where)
    assert result.returncode == 0, result.stdout + result.stderr
    return where / "run"


def copy_run(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    return to


def test_resume_none_refuses_a_directory_that_holds_a_run(tiny_images, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    before = sorted(p.name for p in run.rglob("*"))
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(run),
                        "--resume", "none", cwd=tmp_path)
    assert result.returncode == 2
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in run.rglob("*")) == before


def test_overwrite_moves_the_old_run_aside_and_starts_over(tiny_images, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    old = last(run)
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(run),
                        "--resume", "none", "--overwrite", "--seed", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1
    assert torch.equal(last(moved[0])["queue"]["keys"], old["queue"]["keys"])  # the old run is intact
    assert not torch.equal(last(run)["queue"]["keys"], old["queue"]["keys"])  # and this is a new one


def test_a_different_config_in_the_same_directory_is_refused_but_more_epochs_resume(
        tiny_images, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    changed = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--lr", "0.5", "--out", str(run),
                         cwd=tmp_path)
    assert changed.returncode == 2
    assert "optim.lr was 0.03, now 0.5" in changed.stderr
    longer = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "2", "--out", str(run), cwd=tmp_path)
    assert longer.returncode == 0, longer.stdout + longer.stderr
    assert "resuming from" in longer.stdout and "at epoch 2" in longer.stdout
    assert last(run)["epoch"] == 2 and last(run)["global_step"] == 6


def test_a_run_from_before_unif_groups_resumes_only_as_the_global_form_it_computed(tiny_images, finished_run, tmp_path):
    """An older mauctl wrote no loss.unif_groups: its run took L_uniform over the global batch. The per-group
    default does not continue it silently; asking for the global form does."""
    run = copy_run(finished_run, tmp_path / "run")
    config = run / "config.toml"
    config.write_text(config.read_text().replace('unif_groups = "bn"\n', ""))
    changed = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "2", "--out", str(run), cwd=tmp_path)
    assert changed.returncode == 2
    assert "loss.unif_groups was 'global', now 'bn'" in changed.stderr
    same = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "2", "--set", "loss.unif_groups=global",
                      "--out", str(run), cwd=tmp_path)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "resuming from" in same.stdout and last(run)["epoch"] == 2


def test_resume_path_continues_from_another_runs_checkpoint(tiny_images, finished_run, tmp_path):
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "2", "--out", str(tmp_path / "run2"),
                        "--resume", str(finished_run / "checkpoints" / "last.pt"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert last(tmp_path / "run2")["global_step"] == 6  # 3 steps done before, 3 here


def test_a_folder_that_is_not_a_run_is_never_written_into(tiny_images, tmp_path):
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(mine), cwd=tmp_path)
    assert result.returncode == 2 and "not a mauctl run directory" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_demo_preset_needs_no_data_argument(tmp_path):
    result = run_mauctl("pretrain", "--preset", "demo", "--epochs", "1", "--batch-size", "256",
                        "--set", "model.queue_size=512", "--image-size", "8", "--workers", "0",
                        "--out", str(tmp_path / "demo"), cwd=tmp_path, MAUCTL_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1,438 images, 10 classes" in result.stdout
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["dataset"]["root"].startswith(str(tmp_path / "cache"))


def test_inside_an_outside_torchrun_each_process_is_a_worker(tiny_images, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mauctl", "pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(run)]
    result = subprocess.run(cmd, cwd=tmp_path, env=mauctl_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2
    assert last(run)["global_step"] == 3


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_sigusr1_to_one_worker_stops_every_rank_with_a_checkpoint(tiny_images, tmp_path):
    run = tmp_path / "run"
    proc = start_mauctl("pretrain", str(tiny_images), *TINY, "--batch-size", "4", "--set", "model.queue_size=16",
                        "--epochs", "2", "--nproc-per-node", "2", "--out", str(run), cwd=tmp_path)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or '"step"' not in (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    workers = [p for p in _children(proc.pid) if b"mauctl.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2
    import os

    os.kill(workers[1], signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["signal"] == "SIGUSR1"
    assert 0 < last(run)["step_in_epoch"] < 12
    again = run_mauctl("pretrain", str(tiny_images), *TINY, "--batch-size", "4", "--set", "model.queue_size=16",
                       "--epochs", "2", "--nproc-per-node", "2", "--out", str(run), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert last(run)["epoch"] == 2


def test_running_a_finished_run_again_does_nothing(tiny_images, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    before = last(run)
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already finished" in result.stdout
    assert torch.equal(last(run)["queue"]["keys"], before["queue"]["keys"])
