"""What a user watching a run sees: the progress bar at 80 columns, plain lines in a pipe or a SLURM log."""

from __future__ import annotations

import io
import re

from rich.console import Console

from mauctl.engine.progress import Reporter, duration

TERMS = {"loss": -0.4245, "align": 1.1304, "unif": -3.8159, "grad_norm": 49.4531, "lr": 0.015, "img/s": 120}


def console(width: int, terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width, force_terminal=terminal, color_system=None, soft_wrap=True), buffer


def screen_lines(text: str) -> list[str]:
    """What a terminal shows last on each line: carriage returns and erase-line codes applied."""
    text = re.sub(r"\x1b\[\?25[lh]", "", text)
    lines = []
    for raw in text.split("\n"):
        shown = re.split(r"\r|\x1b\[2K|\x1b\[1A", raw)
        lines.append(next((part for part in reversed(shown) if part), ""))
    return [line for line in lines if line]


def step(reporter: Reporter, epoch: int, done: int) -> None:
    reporter.step({"kind": "step", "epoch": epoch, "step": done, "step_in_epoch": done}, TERMS)


def test_the_bar_at_80_columns_keeps_epoch_step_and_eta_and_cuts_the_terms():
    screen, buffer = console(80, terminal=True)
    reporter = Reporter(True, "pretrain", None, epochs=10, console=screen)
    reporter.start_epoch(2, steps=250)
    step(reporter, 2, 5)
    step(reporter, 2, 120)
    lines = screen_lines(buffer.getvalue())
    assert lines, buffer.getvalue()
    last = lines[-1]
    assert all(len(line) <= 80 for line in lines), lines
    assert last.startswith("pretrain epoch 3/10 ") and " 120/250 eta " in last and ", run " in last, last
    assert "loss -0.4245" in last and last.endswith("…"), last  # the terms are what gets cut


def test_plain_lines_carry_epoch_step_and_the_time_left_in_the_epoch_and_the_run():
    log, buffer = console(200, terminal=False)
    reporter = Reporter(True, "lincls", None, epochs=4, console=log)
    reporter.start_epoch(0, steps=10)
    step(reporter, 0, 5)
    line = buffer.getvalue().strip()
    assert re.fullmatch(r"lincls epoch 1/4 step 5/10 \(eta \d+:\d\d, run \d+:\d\d\): loss -0\.4245 .* img/s 120",
                        line), line


def test_a_stop_message_is_the_last_thing_on_screen():
    screen, buffer = console(80, terminal=True)
    reporter = Reporter(True, "pretrain", None, epochs=2, console=screen)
    reporter.start_epoch(0, steps=50)
    step(reporter, 0, 10)
    reporter.finish("pretrain stopped by SIGINT at epoch 1, step 10: checkpoint saved")
    reporter.close()
    lines = screen_lines(buffer.getvalue())
    assert lines[-1] == "pretrain stopped by SIGINT at epoch 1, step 10: checkpoint saved", lines


def test_the_run_eta_counts_the_epochs_left_at_the_pace_of_the_last_whole_epoch(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("mauctl.engine.progress.time.perf_counter", lambda: clock[0])
    reporter = Reporter(False, "pretrain", None, epochs=5)
    reporter.start_epoch(0, steps=10)
    clock[0] += 30.0  # 10 steps of 2 s, then 10 s of checkpoint and diagnostics
    reporter.start_epoch(1, steps=10)
    clock[0] += 8.0  # 4 steps of 2 s
    epoch_left, run_left = reporter.eta(4)
    assert epoch_left == 12.0 and run_left == 12.0 + 3 * 30.0


def test_durations_read_as_clock_times():
    assert [duration(s) for s in (0, 42.4, 605, 3 * 3600 + 137)] == ["0:00", "0:42", "10:05", "3:02:17"]
