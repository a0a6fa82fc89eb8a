"""What rank 0 shows and records: a rich bar per epoch (plain lines off a terminal), metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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


class Reporter:
    """Rank 0's view of training. Other ranks get a Reporter with ``enabled=False``: it does nothing."""

    def __init__(self, enabled: bool, title: str, log: MetricsLog | None) -> None:
        self.enabled = enabled
        self.title = title
        self.log = log
        self.interactive = enabled and sys.stdout.isatty()
        self.console = Console(soft_wrap=True)
        self._progress: Progress | None = None
        self._task = None
        self._epoch_start = 0.0

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    def start_epoch(self, epoch: int, epochs: int, steps: int, first_step: int = 0) -> None:
        self._epoch_start = time.perf_counter()
        if not self.interactive:
            return
        self._progress = Progress(
            TextColumn(f"[bold]{self.title}[/] epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[values]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("epoch", total=steps, completed=first_step, values="")

    def record(self, record: dict[str, Any]) -> None:
        """Write a record to metrics.jsonl only (no line)."""
        if self.enabled and self.log is not None:
            self.log.write(record)

    def step(self, record: dict[str, Any], shown: dict[str, float], steps: int) -> None:
        if not self.enabled:
            return
        if self.log is not None:
            self.log.write(record)
        text = format_values(shown)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step_in_epoch"], values=text)
        else:
            self.line(f"{self.title} epoch {record['epoch'] + 1} step {record['step_in_epoch']}/{steps} {text}")

    def end_epoch(self, record: dict[str, Any], shown: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.log is not None:
            self.log.write(record)
            self.log.sync()
        seconds = time.perf_counter() - self._epoch_start
        self.line(f"{self.title} epoch {record['epoch'] + 1} done in {seconds:.1f}s: {format_values(shown)}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self.log is not None:
            self.log.close()
