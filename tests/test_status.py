"""`mauctl status`: the state, progress and top-1 of every run and sweep cell, at 80 columns and in a pipe.

The run directories are real: one tiny `mauctl pretrain` (2 epochs) and `mauctl lincls` (1 epoch) per
module, copied, and their status.json rewritten with RunDir.set_status as the trainer writes it when it
stops, fails or is killed. The sweep's plan is written with mauctl.plan. For the queued and running
cells, a fake `squeue` placed first on the PATH prints the states of two jobs, as `squeue -h -r -o
%i|%T` does; the real SLURM is exercised by the end-to-end sweep test. A local job's process is a
real one (`sleep`).
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import TINY, mauctl_env, run_mauctl, start_mauctl
from mauctl import plan as plans
from mauctl import slurm
from mauctl.cli import app
from mauctl.compat import tomllib
from mauctl.engine.progress import read_metrics
from mauctl.engine.rundir import RunDir
from mauctl.status import (STALE_AFTER, collect, name_lines, render_markdown, render_rich, short_duration,
                           status_data)

slow = pytest.mark.slow
SQUEUE = "#!/bin/sh\nprintf '4242_1|RUNNING\\n4242_2|PENDING\\n'\n"  # the other jobs have ended
BROKEN_SQUEUE = "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n"


@pytest.fixture(scope="module")
def real_run(tiny_images, tmp_path_factory) -> Path:
    """A finished 2-epoch pretraining with a finished 1-epoch probe in lincls/lincls."""
    where = tmp_path_factory.mktemp("real")
    run = where / "run"
    done = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "2", "--set", "eval.every=0",
                      "--device", "cpu", "--out", str(run), cwd=where)
    assert done.returncode == 0, done.stdout + done.stderr
    probe = run_mauctl("lincls", str(run), "--epochs", "1", "--batch-size", "16", "--lr", "0.1", "--workers", "0",
                       cwd=where)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    return run


def copy_run(run: Path, to: Path, *, probe: bool = True, epochs_done: int | None = None) -> Path:
    """A copy of ``run``; without its probe; cut after ``epochs_done`` epochs, as a run still in its next."""
    to.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    if not probe:
        subprocess.run(["rm", "-r", str(to / "lincls")], check=True)
    if epochs_done is not None:
        kept, epochs = [], 0
        for record in read_metrics(to / "metrics.jsonl"):
            if epochs == epochs_done and record["kind"] != "step":
                break
            kept.append(record)
            epochs += record["kind"] == "epoch"
        (to / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return to


def make_cell(sweep: Path, cell_id: str, real: Path, *jobs: dict) -> plans.Cell:
    preset, loss = cell_id.split("_")[:2]
    run = sweep / cell_id
    return plans.Cell(id=cell_id, preset=preset, loss=loss, seed=0, table="imagenet100", row=preset,
                      data="/data", run=str(run), probe=str(run / "lincls" / "lincls"), probe_preset="lincls",
                      config=tomllib.loads((real / "config.toml").read_text()), digest="",
                      commands=[["pretrain", "/data", "--out", str(run)], ["lincls", str(run), "--epochs", "1"]],
                      steps={"pretrain": 6, "probe": 3}, jobs=list(jobs))


def slurm_job(job_id: str) -> dict:
    return {"executor": "slurm", "id": job_id, "time": plans.now()}


def three_hours_ago(run: Path) -> None:
    then = time.time() - 3 * 3600
    for name in ("metrics.jsonl", "status.json"):
        os.utime(run / name, (then, then))


# cell id -> what `status` shows for it
EXPECTED = {
    "v2-b256_align3-unif3": ("finished", "4242_0"),
    "v2-b256_contr-t0.07": ("running", "4242_1"),
    "v2-b256-lr0.06_align3-unif3": ("queued", "4242_2"),
    "v1-b128_contr-t0.2": ("stopped", "4242_3"),
    "in1k-v2-b256_align3-unif3": ("failed", None),
    "v1-b256-lr0.06_align4-unif4": ("stopped", None),
    "v2-b128_align2-unif2": ("not started", None),
    "v1-b256_align2-unif2": ("running", "4242_4"),
    "v2-b256_align4-unif4": ("running", "local"),
    "v2-b128_align4-unif4": ("failed", "local"),
}


@pytest.fixture(scope="module")
def sweep(real_run, tmp_path_factory):
    """A sweep folder with a cell in every state, and a run of its own that is no cell."""
    root = tmp_path_factory.mktemp("sweep")
    out = root / "runs"
    live = subprocess.Popen(["sleep", "600"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = os.uname().nodename
    cells = []

    def add(cell_id: str, *jobs: dict) -> Path:
        cells.append(make_cell(out, cell_id, real_run, *jobs))
        return out / cell_id

    copy_run(real_run, add("v2-b256_align3-unif3", slurm_job("4242_0")))
    running = copy_run(real_run, add("v2-b256_contr-t0.07", slurm_job("4242_1")), probe=False, epochs_done=1)
    RunDir(running).set_status("running", epoch=1, step_in_epoch=0)
    add("v2-b256-lr0.06_align3-unif3", slurm_job("4242_2"))
    stopped = copy_run(real_run, add("v1-b128_contr-t0.2", slurm_job("4242_3")), probe=False, epochs_done=1)
    RunDir(stopped).set_status("stopped", epoch=1, step_in_epoch=2, signal="SIGUSR1")
    failed = copy_run(real_run, add("in1k-v2-b256_align3-unif3"), probe=False, epochs_done=1)
    RunDir(failed).set_status("failed", epoch=1, step_in_epoch=3, reason="non-finite loss")
    copy_run(real_run, add("v1-b256-lr0.06_align4-unif4"), probe=False)
    add("v2-b128_align2-unif2")
    killed = copy_run(real_run, add("v1-b256_align2-unif2", slurm_job("4242_4")), probe=False, epochs_done=1)
    RunDir(killed).set_status("running", epoch=1, step_in_epoch=0)
    three_hours_ago(killed)
    local = copy_run(real_run, add("v2-b256_align4-unif4", {"executor": "local", "id": "local", "time": plans.now(),
                                                             "pid": live.pid, "host": host}),
                     probe=False, epochs_done=1)
    RunDir(local).set_status("running", epoch=1, step_in_epoch=0)
    add("v2-b128_align4-unif4", {"executor": "local", "id": "local", "time": plans.now(), "pid": gone.pid,
                                 "host": host})
    plans.write_plan(plans.Plan(out=str(out), cells={c.id: c for c in cells}))
    copy_run(real_run, out / "extra")  # a run of the user's, in the same folder
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(SQUEUE)
    (bin_dir / "squeue").chmod(0o755)
    yield out, bin_dir
    live.kill()
    live.wait()


@pytest.fixture
def squeue_on_path(sweep, monkeypatch):
    out, bin_dir = sweep
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(out.parent)  # a run is named by its path from here
    return out


def results(run: Path) -> dict:
    return json.loads((run / "lincls" / "lincls" / "results.json").read_text())


@slow
def test_every_cell_shows_its_state_and_job_once_and_the_loose_run_after_them(squeue_on_path, real_run):
    asked = []

    def job_states(ids):
        asked.append(ids)
        return slurm.job_states(ids)

    status = collect([squeue_on_path], job_states=job_states)
    assert asked == [["4242_1", "4242_2", "4242_3", "4242_4"]]  # once; not about the finished cell's job
    rows = {r.name: r for r in status.rows}
    assert [r.name for r in status.rows] == [*EXPECTED, "runs/extra"]  # plan order; cells not again as loose runs
    assert [r.name for r in collect([squeue_on_path / "sweep.json"]).rows] == [*EXPECTED, "runs/extra"]
    assert {n: (rows[n].state, rows[n].job) for n in EXPECTED} == EXPECTED
    finished = rows["v2-b256_align3-unif3"]
    assert finished.top1 == {"lincls": results(real_run)["best_top1"]}
    assert (finished.phase, finished.epoch, finished.epochs) == ("probe", 1, 1)
    running = rows["v2-b256_contr-t0.07"]
    assert (running.phase, running.epoch, running.epochs, running.job_state) == ("pretrain", 1, 2, "RUNNING")
    assert running.eta_s > 0 and running.idle_s is None
    assert set(running.terms) == {"align", "unif"}
    assert rows["v2-b256-lr0.06_align3-unif3"].job_state == "PENDING"
    assert rows["v1-b128_contr-t0.2"].signal == "SIGUSR1"
    assert rows["v1-b256-lr0.06_align4-unif4"].no_probe_yet  # pretrained, probe not started, no job
    assert rows["v1-b256_align2-unif2"].idle_s > 3 * 3600 - 60  # says running, but its job ended 3 h ago
    assert rows["v2-b256_align4-unif4"].idle_s is None  # its process lives
    assert rows["runs/extra"].state == "finished" and rows["runs/extra"].kind == "run"
    assert any("in1k-v2-b256_align3-unif3: pretrain failed at epoch 2: non-finite loss" in n for n in status.notes)
    assert any("v2-b128_align4-unif4: its job local ended before the run started" in n for n in status.notes)


def rich_text(paths: list[Path], width: int) -> str:
    buffer = io.StringIO()
    render_rich(collect(paths), Console(file=buffer, width=width, soft_wrap=True))  # soft_wrap: as the CLI's
    return buffer.getvalue()


@slow
def test_at_80_columns_every_line_fits_and_no_value_is_cut(squeue_on_path, real_run):
    text = rich_text([squeue_on_path], 80)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, text
    assert "…" not in text
    for name in [*EXPECTED, "runs/extra"]:
        assert any(line.startswith(name + " ") for line in lines), (name, text)
    for value in ("4242_1", "4242_2", "4242_3", "SIGUSR1", "no update", "no probe", f"{results(real_run)['best_top1']:.2f}",
                  "pretrain", "probe", "1/2", "0/2", "1/1", "al ", "un "):
        assert value in text, (value, text)
    words = " ".join(text.split())  # the line under the table wraps at 80 columns
    assert "10 cells, 1 run: 3 running, 1 queued, 2 stopped, 2 failed, 1 not started, 2 finished" in words


@slow
def test_a_wide_terminal_gets_one_line_per_row(squeue_on_path):
    text = rich_text([squeue_on_path], 160)
    assert "running 4242_4 (no update for 3 h)" in text
    assert "stopped 4242_3 (SIGUSR1)" in text
    assert len([line for line in text.splitlines() if line.startswith(("v1-", "v2-", "in1k-", "runs/extra"))]) == 11


@slow
def test_a_long_cell_id_is_broken_between_preset_loss_and_seed_not_cut(real_run, tmp_path):
    out = tmp_path / "runs"
    cells = [make_cell(out, f"v2-b256-lr0.06_align3-unif3_seed{n}", real_run, slurm_job(f"12345678_{n}"))
             for n in (10, 11)]
    copy_run(real_run, out / cells[0].id)
    plans.write_plan(plans.Plan(out=str(out), cells={c.id: c for c in cells}))
    text = rich_text([out], 80)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80 and "…" not in text
    assert "v2-b256-lr0.06_align3-unif3_seed10" not in text  # too wide to stand whole beside the rest
    assert "v2-b256-lr0.06 " in text and "_align3-unif3_seed10" in text and "12345678_11" in text


@slow
def test_in_a_pipe_the_command_prints_the_80_column_table(squeue_on_path, sweep):
    out, bin_dir = sweep
    result = run_mauctl("status", str(out), cwd=out.parent, COLUMNS="",
                        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert max(len(line.rstrip()) for line in result.stdout.splitlines()) <= 80
    assert "v2-b256-lr0.06_align3-unif3" in result.stdout and "4242_2" in result.stdout


@slow
def test_json_is_one_object_per_row_with_raw_numbers_and_the_notes(squeue_on_path, real_run):
    result = CliRunner().invoke(app, ["status", str(squeue_on_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "mauctl.status/1" and len(data["rows"]) == 11
    rows = {r["name"]: r for r in data["rows"]}
    finished = rows["v2-b256_align3-unif3"]
    assert finished["top1"] == results(real_run)["best_top1"] and finished["eta_s"] is None
    last_epoch = next(r for r in read_metrics(real_run / "metrics.jsonl") if r["kind"] == "epoch")
    running = rows["v2-b256_contr-t0.07"]
    assert running["images_per_s"] == last_epoch["images_per_s"]  # the epoch the cut copy has
    last_step = read_metrics(squeue_on_path / "v2-b256_contr-t0.07" / "metrics.jsonl")[-1]  # in its second epoch
    assert running["losses"] == {"align": last_step["align"], "unif": last_step["unif"]}
    assert (running["state"], running["job"], running["job_state"], running["epoch"], running["epochs"]) == \
        ("running", "4242_1", "RUNNING", 1, 2)
    assert running["eta_s"] > 0 and running["run"] == str(squeue_on_path / "v2-b256_contr-t0.07")
    assert rows["v2-b128_align2-unif2"]["images_per_s"] is None and rows["v2-b128_align2-unif2"]["top1"] is None
    assert rows["in1k-v2-b256_align3-unif3"]["reason"] == "non-finite loss"
    assert any("non-finite loss" in note for note in data["notes"])


@slow
def test_markdown_is_a_github_table_with_a_line_per_row(squeue_on_path):
    text = render_markdown(collect([squeue_on_path]))
    lines = text.splitlines()
    assert lines[0] == "| run | state | epoch | img/s | ETA | loss | top-1 |"  # cells and a run: "run"
    assert lines[1] == "|---|---|---|--:|--:|---|--:|"
    table = lines[2:lines.index("")]
    assert len(table) == 11 and all(line.count("|") == 8 for line in table)
    assert "| v1-b128_contr-t0.2 | stopped 4242_3 (SIGUSR1) | pretrain 1/2 |" in text
    assert "Notes:" in lines


@slow
def test_without_squeue_the_states_are_the_directories_and_a_note_says_why(sweep, tmp_path, monkeypatch):
    out, _ = sweep
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no squeue at all
    status = collect([out])
    rows = {r.name: r for r in status.rows}
    assert status.notes[0].startswith("squeue failed (squeue is not on the PATH)")
    assert rows["v2-b256_contr-t0.07"].state == "running" and rows["v2-b256_contr-t0.07"].idle_s is None
    assert rows["v2-b256-lr0.06_align3-unif3"].state == "submitted"  # it may be queued or have ended
    assert rows["v2-b256_align3-unif3"].state == "finished"
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "squeue").write_text(BROKEN_SQUEUE)
    (broken / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{broken}{os.pathsep}/usr/bin{os.pathsep}/bin")
    note = collect([out]).notes[0]
    assert note.startswith("squeue failed (squeue failed: slurm_load_jobs error: Unable to contact slurm controller)")


def test_squeue_is_not_asked_without_slurm_jobs(tmp_path):
    out = tmp_path / "runs"
    cell = bare_cell(out, "v2-b256_contr-t0.07")
    plans.write_plan(plans.Plan(out=str(out), cells={cell.id: cell}))

    def no_squeue(ids):
        raise AssertionError(f"squeue asked about {ids}")

    status = collect([out], job_states=no_squeue)
    assert [(r.name, r.state, r.epoch, r.epochs) for r in status.rows] == [("v2-b256_contr-t0.07", "not started", 0,
                                                                            200)]
    assert status.notes == []


def bare_cell(out: Path, cell_id: str) -> plans.Cell:
    """A planned cell with the published defaults (200 pretraining epochs), never submitted."""
    run = out / cell_id
    return plans.Cell(id=cell_id, preset="v2-b256", loss="contr-t0.07", seed=0, table="imagenet100", row="v2-b256",
                      data="/data", run=str(run), probe=str(run / "lincls" / "lincls"), probe_preset="lincls",
                      config={"optim": {"epochs": 200}}, digest="", commands=[["pretrain"], ["lincls", str(run)]],
                      steps={"pretrain": 1, "probe": 1})


@slow
def test_a_lone_run_is_finished_with_its_probe_or_flagged_when_it_went_silent(real_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_run(real_run, tmp_path / "runs" / "done")
    silent = copy_run(real_run, tmp_path / "runs" / "silent", probe=False, epochs_done=1)
    RunDir(silent).set_status("running", epoch=1, step_in_epoch=0)
    fresh = copy_run(real_run, tmp_path / "runs" / "fresh", probe=False, epochs_done=1)
    RunDir(fresh).set_status("running", epoch=1, step_in_epoch=0)
    three_hours_ago(silent)
    status = collect([])  # runs/ by default
    rows = {r.name: r for r in status.rows}
    assert list(rows) == ["runs/done", "runs/fresh", "runs/silent"]
    assert rows["runs/done"].state == "finished" and rows["runs/done"].top1 == {"lincls":
                                                                               results(real_run)["best_top1"]}
    assert rows["runs/fresh"].state == "running" and rows["runs/fresh"].idle_s is None
    assert rows["runs/silent"].state == "running" and rows["runs/silent"].idle_s > STALE_AFTER
    probe = collect([Path("runs/done/lincls/lincls")]).rows[0]
    assert (probe.kind, probe.state, probe.phase, probe.epoch, probe.epochs) == ("probe", "finished", "probe", 1, 1)


def test_a_path_that_is_no_run_sweep_or_folder_exits_2_naming_it(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for path in (tmp_path / "nope", tmp_path / "file.txt"):
        result = CliRunner().invoke(app, ["status", str(path)])
        assert result.exit_code == 2, result.output
        assert str(path) in result.output.replace("\n", "") and "Traceback" not in result.output


def test_an_unknown_format_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["status", str(tmp_path), "--format", "csv"])
    assert result.exit_code == 2 and "--format 'csv'" in result.output


def running_run(real_run: Path, where: Path) -> Path:
    run = copy_run(real_run, where / "runs" / "run", probe=False, epochs_done=1)
    RunDir(run).set_status("running", epoch=1, step_in_epoch=0)
    return run


def read_until(proc: subprocess.Popen, text: str, timeout: float = 60) -> str:
    seen, end = "", time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < end, seen
        line = proc.stdout.readline()
        assert line, seen  # it ended first
        seen += line
    return seen


@slow
def test_watch_in_a_pipe_prints_again_only_when_it_changed_and_ends_when_all_are_done(real_run, tmp_path):
    run = running_run(real_run, tmp_path)
    proc = start_mauctl("status", "runs", "--watch", "--interval", "0.2", cwd=tmp_path)
    try:
        first = read_until(proc, "1 run: 1 running")
        time.sleep(1.0)  # five more looks, nothing changed: nothing printed
        RunDir(run).set_status("finished", epoch=2, step_in_epoch=0, global_step=6)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, first + rest
    assert first.count("status at ") == 1 and rest.count("status at ") == 1
    assert "1 run: 1 finished" in rest


@slow
def test_ctrl_c_ends_watch_quietly_with_exit_status_0(real_run, tmp_path):
    running_run(real_run, tmp_path)
    proc = start_mauctl("status", "--watch", "--interval", "0.2", "--format", "json", cwd=tmp_path)
    try:
        first = read_until(proc, "\n")
        assert json.loads(first)["rows"][0]["state"] == "running"  # JSON: one object per line
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and rest == "", rest


def read_terminal(fd: int, until: bytes, count: int = 1, timeout: float = 60) -> bytes:
    """What a process wrote to its terminal, until ``until`` has come ``count`` times (or it closed)."""
    seen, end = b"", time.monotonic() + timeout
    while seen.count(until) < count and time.monotonic() < end:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the process has ended and closed the terminal
                break
            if not data:
                break
            seen += data
    return seen


@slow
def test_in_a_terminal_watch_redraws_in_place_and_ctrl_c_exits_0(real_run, tmp_path):
    running_run(real_run, tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: mauctl in a terminal of its own
        try:
            os.chdir(tmp_path)
            os.execve(sys.executable, [sys.executable, "-m", "mauctl", "status", "--watch", "--interval", "0.2"],
                      mauctl_env(COLUMNS="100"))
        finally:
            os._exit(127)
    try:
        shown = read_terminal(fd, b"Ctrl-C to stop", count=3)
        assert shown.count(b"Ctrl-C to stop") == 3, shown
        os.kill(pid, signal.SIGINT)
        rest = read_terminal(fd, b"never")
    finally:
        _, code = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(code) == 0, shown + rest
    assert b"\x1b[1A" in shown  # the cursor goes back up: the table is redrawn in place
    assert b"Traceback" not in rest and b"Aborted" not in rest


def test_names_break_before_an_underscore_or_after_a_slash_only():
    assert name_lines("v2-b256-lr0.06_align3-unif3_seed1", 20) == ["v2-b256-lr0.06", "_align3-unif3_seed1"]
    assert name_lines("v2-b256_align3-unif3", 20) == ["v2-b256_align3-unif3"]
    assert name_lines("runs/sweep-2026/v2-b256_contr-t0.07", 16) == ["runs/sweep-2026/", "v2-b256", "_contr-t0.07"]
    assert name_lines("averyveryverylongname", 8) == ["averyveryverylongname"]


def test_durations_take_at_most_five_characters():
    assert [short_duration(s) for s in (None, 42, 720, 5 * 3600 + 7 * 60, 31 * 3600, 3 * 86400 + 4 * 3600,
                                        12 * 86400)] == ["-", "42s", "12m", "5h07m", "31h", "3d04h", "12d"]


def test_json_of_nothing_found_is_an_empty_list_with_a_note(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = status_data(collect([]))
    assert data["rows"] == [] and "no runs/ folder" in data["notes"][0]
