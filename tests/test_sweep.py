"""`mauctl sweep` on this machine: the plan, --dry-run, the local executor, stopping and going on.

The SLURM executor is tested against a real slurmctld in test_sweep_slurm.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import run_mauctl, start_mauctl

from mauctl.plan import read_plan
from mauctl.sweep import parse_seeds, parse_time

# Every cell tiny: resnet18 at 32 px, batch 16, no diagnostics; a probe of one epoch.
TINY_CELL = ["--set", 'model.arch="resnet18"', "--set", "data.image_size=32", "--set", "optim.batch_size=16",
             "--set", "model.queue_size=64", "--set", "model.dim=32", "--set", "data.workers=0",
             "--set", "eval.every=0", "--set", "run.print_freq=1",
             "--probe-set", "optim.batch_size=16", "--probe-set", "optim.epochs=1", "--probe-set", "data.workers=0",
             "--gpus-per-node", "0"]
TWO_CELLS = ["--presets", "v2-b256", "--losses", "contr-t0.2,align3-unif3"]


def epochs_in(run: Path) -> list[int]:
    """The epochs that metrics.jsonl records as done, in order (a redone epoch shows twice)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in records if r.get("kind") == "epoch"]


def test_the_default_dry_run_lists_the_30_imagenet100_cells_with_their_steps_and_writes_nothing(tmp_path):
    done = run_mauctl("sweep", "--dry-run", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "30 cells" in text and "steps counted on ImageNet-100's 126,689 train images" in text
    # 200 epochs of 126,689 // batch steps; the probe: 100 epochs of 126,689 // 256
    assert "v1-b128_contr-t0.07          new          197,800    49,400" in text
    assert "v2-b256-lr0.06_align4-unif4  new           98,800    49,400" in text
    assert "to run: 30 cells, 3,954,000 pretraining steps and 1,482,000 probe steps" in text
    runs = tmp_path / "runs"
    assert f"mauctl pretrain DATA --preset v2-b256 --loss align3-unif3 --seed 0 --out {runs}/v2-b256_align3-unif3" in text
    assert f"mauctl lincls {runs}/v2-b256_align3-unif3 --preset lincls" in text
    assert not runs.exists()


def test_a_dry_run_with_a_bench_result_estimates_gpu_hours(tmp_path):
    bench = {"format": 1, "machine": {"gpu": "NVIDIA H200"}, "device": "cuda:0", "precision": "bf16",
             "compile": False, "channels_last": True, "arch": "resnet50", "image_size": 224, "batch_size": 256,
             "workers": 8, "images": 2000, "peak_rss_bytes": 0,
             "results": [{"measure": "compute", "pipeline": None, "images_per_s": 1780.0},
                         {"measure": "end-to-end", "pipeline": "tensor", "images_per_s": 1000.0}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    done = run_mauctl("sweep", "--dry-run", "--presets", "v2-b256", "--losses", "align3-unif3",
                      "--bench", "bench.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # 98,800 steps x 256 images at 1,000 images/s = 7.03 h; the probe 49,400 x 256 = 3.51 h
    assert "GPU-hours at 1,000 images/s per GPU (end to end, resnet50 at 224 px, bf16, on NVIDIA H200" in done.stdout
    assert "7 pretraining + 4 probe (at the same rate: an upper bound) = 11" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--presets", "v2-b256,in1k-v2-b256", "--dry-run"], "--presets mixes datasets"),
    (["--losses", "align3-unif", "--dry-run"], "unknown loss 'align3-unif' (did you mean 'align3-unif3'?)"),
    (["--presets", "lincls", "--dry-run"], "'lincls' is a lincls preset, not a pretraining one"),
    (["--presets", "v2-b256"], "no DATA"),
    (["--nodes", "2", "--dry-run"], "--nodes > 1 needs --executor slurm"),
    (["--time", "soon", "--dry-run"], "--time 'soon'"),
    (["--seeds", "3-1", "--dry-run"], "--seeds '3-1'"),
    (["--executor", "pbs", "--dry-run"], "--executor 'pbs': expected local or slurm"),
    (["--partition", "gpu", "--sbatch", "qos=high", "--dry-run"], "--partition, --sbatch: only for --executor slurm"),
    (["--bench", "b.json"], "--bench is for --dry-run"),
])
def test_a_mistake_exits_2_before_anything_runs(tmp_path, args, message):
    done = run_mauctl("sweep", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_seeds_and_time_limits_read_as_slurm_writes_them():
    assert parse_seeds(None) == [0] and parse_seeds("0,2") == [0, 2] and parse_seeds("1-3,3") == [1, 2, 3]
    assert parse_time("90") == 90 and parse_time("24:00:00") == 1440 and parse_time("1:30") == 2
    assert parse_time("2-00:00:00") == 2880 and parse_time("1-12") == 2160


def test_a_second_sweep_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, tiny_images):
    import fcntl
    import os

    out = tmp_path / "runs"
    out.mkdir()
    fd = os.open(out / ".sweep.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 1 on elsewhere\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        done = run_mauctl("sweep", str(tiny_images), *TWO_CELLS, *TINY_CELL, "--out", str(out), cwd=tmp_path)
    finally:
        os.close(fd)
    assert done.returncode == 2
    assert f"another mauctl sweep is working on {out} (pid 1 on elsewhere)" in done.stderr


@pytest.mark.slow
def test_a_local_sweep_stops_on_sigterm_goes_on_where_it_stopped_and_then_has_nothing_to_do(tmp_path, tiny_images):
    out = tmp_path / "runs"
    args = ["sweep", str(tiny_images), *TWO_CELLS, *TINY_CELL, "--set", "optim.epochs=3", "--out", str(out)]
    first_cell, second_cell = out / "v2-b256_contr-t0.2", out / "v2-b256_align3-unif3"

    # stop the sweep (SIGTERM, as a shutdown would) once the first cell has finished an epoch
    sweep = start_mauctl(*args, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not ((first_cell / "metrics.jsonl").exists() and epochs_in(first_cell)):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.stdout.read()
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=180)[0]
    assert sweep.returncode == 75, output
    assert "run the same mauctl sweep to go on" in output
    stopped = json.loads((first_cell / "status.json").read_text())
    assert stopped["state"] == "stopped" and stopped["signal"] == "SIGTERM"
    assert not second_cell.exists()

    # the same command goes on: the first cell from its checkpoint (no epoch twice), then the second
    again = run_mauctl(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 cells in" in again.stdout and "0 finished, 0 queued or running, 2 to run" in again.stdout
    assert epochs_in(first_cell) == [0, 1, 2] and epochs_in(second_cell) == [0, 1, 2]
    for cell in (first_cell, second_cell):
        results = json.loads((cell / "lincls" / "lincls" / "results.json").read_text())
        assert 0 <= results["best_top1"] <= 100
    plan = read_plan(out)
    assert list(plan.cells) == ["v2-b256_contr-t0.2", "v2-b256_align3-unif3"]
    assert [len(c.jobs) for c in plan.cells.values()] == [2, 2]  # both queued here by each sweep
    assert plan.cells["v2-b256_contr-t0.2"].jobs[0]["executor"] == "local"

    # a third time: nothing to do, nothing touched
    checkpoint = first_cell / "checkpoints" / "last.pt"
    mtime = checkpoint.stat().st_mtime_ns
    third = run_mauctl(*args, cwd=tmp_path)
    assert third.returncode == 0 and "2 finished, 0 queued or running, 0 to run" in third.stdout
    assert checkpoint.stat().st_mtime_ns == mtime

    # more seeds add cells and keep the finished ones
    more = run_mauctl(*args, "--seeds", "0,1", "--dry-run", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert "v2-b256_contr-t0.2          finished" in more.stdout
    assert "v2-b256_contr-t0.2_seed1    new" in more.stdout
    assert "to run: 2 cells" in more.stdout

    # report and status find the cells' probes
    report = run_mauctl("report", str(out), "--format", "json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    shown = json.loads(report.stdout)["other_runs"]  # a 3-class folder: no table row, listed apart
    assert sorted(Path(e["run"]).name for e in shown) == ["v2-b256_align3-unif3", "v2-b256_contr-t0.2"]


def test_an_unfinished_cell_with_another_config_in_its_directory_is_refused(tmp_path, tiny_images):
    out = tmp_path / "runs"
    run = out / "v2-b256_contr-t0.2"
    run.mkdir(parents=True)
    other = run_mauctl("pretrain", str(tiny_images), "--preset", "v2-b256", "--loss", "contr-t0.2", "--lr", "0.5",
                       "--out", str(run), *TINY_CELL[:16], "--dry-run", cwd=tmp_path)
    (run / "config.toml").write_text(other.stdout)  # a run started with another LR
    done = run_mauctl("sweep", str(tiny_images), *TWO_CELLS, *TINY_CELL, "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cell v2-b256_contr-t0.2: {run} holds a run with a different configuration" in done.stderr
    assert "optim.lr was 0.5, now 0.03" in done.stderr
    assert not (out / "sweep.json").exists()


def test_the_slurm_executor_where_slurm_is_missing_says_so_before_anything_is_written(tmp_path, tiny_images):
    done = run_mauctl("sweep", str(tiny_images), *TWO_CELLS, "--executor", "slurm", "--out", "runs", cwd=tmp_path,
                      PATH="/nonexistent")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--executor slurm: sbatch, srun, squeue, scontrol not found on the PATH" in done.stderr
    assert not (tmp_path / "runs").exists()
