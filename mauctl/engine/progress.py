"""What rank 0 shows and records: a rich bar per epoch (plain lines off a terminal), metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Column
from rich.text import Text


class MetricsLog:
    """Append-only JSON lines; each line is flushed, so a killed run keeps everything it logged.

    With ``tensorboard`` (a folder), every numeric value of a record that has a ``step`` is
    also written there as the scalar ``<kind>/<name>`` at that step; metrics.jsonl stays the
    source of truth.
    """

    def __init__(self, path: Path, tensorboard: Path | None = None) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._board = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(tensorboard))

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._board is not None and isinstance(record.get("step"), int):
            for name, value in record.items():
                if name not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._board.add_scalar(f"{record.get('kind', 'record')}/{name}", value, record["step"])

    def sync(self) -> None:
        os.fsync(self._file.fileno())
        if self._board is not None:
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


NOT_SCALARS = {"step", "epoch", "step_in_epoch", "epochs_done"}  # the x axis, not a curve


def tensorboard_missing() -> bool:
    """Whether TensorBoard logging cannot work here (the ``tensorboard`` package is not installed)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return True
    return False


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, skipping a last line cut short by a crash."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def format_values(values: dict[str, float]) -> str:
    return " ".join(f"{k} {_fmt(v)}" for k, v in values.items())


def _fmt(v: float) -> str:
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:.0f}"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"


def duration(seconds: float) -> str:
    """``0:42``, ``12:05``, ``3:02:17``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Reporter:
    """Rank 0's view of training: a bar per epoch on a terminal, plain lines elsewhere (pipes, SLURM logs),
    both with epoch i/N, step s/S and the time left in the epoch and in the run; and metrics.jsonl.

    On a terminal narrower than the line, the loss terms are cut, never the epoch, step or ETA.
    Other ranks get a Reporter with ``enabled=False``: it does nothing.
    """

    BAR = 12  # characters of the bar

    def __init__(self, enabled: bool, title: str, log: MetricsLog | None, epochs: int,
                 console: Console | None = None) -> None:
        self.enabled, self.title, self.log, self.epochs = enabled, title, log, epochs
        self.console = console or Console(soft_wrap=True)
        self.interactive = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self.epoch, self.steps, self.first = 0, 0, 0
        self._epoch_start = time.perf_counter()
        self._epoch_seconds: float | None = None  # the last whole epoch, diagnostics and evaluation included
        self._started = False

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False, crop=False)

    def finish(self, text: str) -> None:
        """The last line of a run (stopped, failed): the bar goes first, so it is not drawn again below."""
        self._stop_bar()
        self.line(text)

    def start_epoch(self, epoch: int, steps: int, first_step: int = 0) -> None:
        now = time.perf_counter()
        if self._started and epoch == self.epoch + 1:
            self._epoch_seconds = now - self._epoch_start
        self._started = True
        self.epoch, self.steps, self.first = epoch, steps, first_step
        self._epoch_start = now
        if not self.interactive:
            return
        self._progress = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=self.BAR),
            TextColumn("{task.fields[right]}", table_column=Column(no_wrap=True)),
            console=self.console, transient=False, auto_refresh=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self._where(), total=steps, completed=first_step, right="")
        self._draw(first_step, "")

    def eta(self, done: int) -> tuple[float | None, float | None]:
        """Seconds left in this epoch and in the run, from this epoch's pace (None before its first step)."""
        if done <= self.first:
            return None, None
        per_step = (time.perf_counter() - self._epoch_start) / (done - self.first)
        epoch_left = (self.steps - done) * per_step
        per_epoch = self._epoch_seconds if self._epoch_seconds is not None else self.steps * per_step
        return epoch_left, epoch_left + (self.epochs - self.epoch - 1) * per_epoch

    def _where(self) -> str:
        return f"{self.title} epoch {self.epoch + 1}/{self.epochs}"

    def _eta_text(self, done: int) -> str:
        epoch_left, run_left = self.eta(done)
        if epoch_left is None:
            return "eta -"
        return f"eta {duration(epoch_left)}, run {duration(run_left)}"

    def _draw(self, done: int, values: str) -> None:
        right = f"{done}/{self.steps} {self._eta_text(done)}"
        room = self.console.width - len(self._where()) - self.BAR - len(right) - 4
        if values and room > 1:
            right += "  " + (values if len(values) <= room else values[: room - 1] + "…")
        self._progress.update(self._task, completed=done, right=right)
        self._progress.refresh()

    def warn(self, text: str, record: dict[str, Any]) -> None:
        """A line that stands out (bold red on a terminal; above the bar, which goes on) and its record."""
        if not self.enabled:
            return
        # the style on the Text, not on print(): print's style would also colour the bar it redraws
        self.console.print(Text(text, style="bold red"), highlight=False, crop=False)
        self.record(record)

    def record(self, record: dict[str, Any]) -> None:
        """Write a record to metrics.jsonl only (no line)."""
        if self.enabled and self.log is not None:
            self.log.write(record)

    def step(self, record: dict[str, Any], shown: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.log is not None:
            self.log.write(record)
        done, text = record["step_in_epoch"], format_values(shown)
        if self._progress is not None:
            self._draw(done, text)
        else:
            self.line(f"{self._where()} step {done}/{self.steps} ({self._eta_text(done)}): {text}")

    def end_epoch(self, record: dict[str, Any], shown: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._stop_bar()
        if self.log is not None:
            self.log.write(record)
            self.log.sync()
        seconds = time.perf_counter() - self._epoch_start
        took = f"{seconds:.1f}s" if seconds < 60 else duration(seconds)
        self.line(f"{self._where()} done in {took}: {format_values(shown)}")

    def _stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self._stop_bar()
        if self.log is not None:
            self.log.close()
