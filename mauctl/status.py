"""`mauctl status`: where each run and sweep cell stands: state, epoch, speed, ETA, loss terms, probe top-1.

Reading order: ``collect`` finds the sweeps (folders with a sweep.json, read with ``plan.read_plan``)
and the run directories under the paths, asks squeue once about the sweeps' SLURM jobs, and makes
one ``Row`` per cell (``cell_row``) and per run that is no sweep's cell (``run_row``); ``read_progress``
reads one run directory (a pretraining or a probe); one renderer per format writes the rows.

A cell (a pretraining, then its probe) is, by the first rule that applies:

1. finished: its probe's status.json says finished.
2. queued or running: its last job is active. A SLURM job: what squeue says (``slurm.describe``). A
   local job: its pid is alive on this host; running when the run or its probe says running, else
   queued (waiting for its turn).
3. what its directories say, the probe's status.json once it has one, else the pretraining's: running,
   stopped (with its signal) or failed (its reason in a note). A finished pretraining whose probe has
   not started is stopped ("no probe yet"), between the two.
4. nothing written yet: not started when the cell has no job; failed when its job has ended (squeue
   no longer lists it, or the local pid is gone); submitted when that cannot be known (squeue failed,
   or a local job of another host).

A run that is no sweep's cell: its status.json; once finished, running while one of its probes
(<run>/lincls/<name>) says running, else finished with its probes' top-1 (a stopped or failed probe
gets a note). A probe directory given by itself: its own status.json. A directory with no
status.json yet: not started.

A row that says running although no active job is known (a lone run, a job that has ended, squeue
unavailable) is flagged "no update for 3 h" when its directory has written nothing (metrics.jsonl,
status.json) for STALE_AFTER, or at once when its job has ended: a process killed by SIGKILL, the
out-of-memory killer or a lost node leaves its status at running.

The columns:

- epoch: the phase (pretrain, then probe) and its epochs completed, e/N.
- img/s: the phase's latest epoch's (pretraining; the latest logged step's while its first epoch runs).
  The probe records no speed per epoch: its latest step's.
- ETA, for queued and running rows: the phase's epochs left times its recent epoch time; a cell adds
  its probe's. A pretraining epoch: an epoch's images over the mean img/s of its last RECENT_EPOCHS
  epochs (diagnostics and checkpoints not counted). A probe epoch: the probe's own measure once it has
  one (results.json's wall time per epoch done; in its first epoch, its img/s), else PROBE_EPOCH_SHARE
  of a pretraining epoch: the probe runs one view of each image forward through a frozen backbone
  where pretraining runs two views through two encoders and a backward pass (a third of the compute),
  but decodes the same JPEGs, which often limit both.
- loss: the pretraining's latest logged terms, unweighted: L (contrastive), al (alignment),
  un (uniformity); a probe directory given alone: its cross-entropy.
- top-1: the probe's best top-1 (results.json, read as `mauctl report` reads it).
"""

from __future__ import annotations

import functools
import io
import json
import os
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from mauctl import plan as plans
from mauctl import report, slurm
from mauctl.compat import tomllib
from mauctl.engine.rundir import RunDir
from mauctl.errors import MauctlError, UsageError
from mauctl.terminal import fits, paragraph
from mauctl.text import plural

FORMATS = ("rich", "json", "markdown")
STATUS_FORMAT = "mauctl.status/1"
STALE_AFTER = 30 * 60  # seconds without a write before a running row without an active job is flagged
RECENT_EPOCHS = 3
PROBE_EPOCH_SHARE = 0.5
TAIL_BYTES = 256 * 1024  # of metrics.jsonl: several epochs of records, however long the run
DONE = ("finished", "failed")  # --watch stops when every row is in one of these
STATES = ("running", "queued", "submitted", "stopped", "failed", "not started", "finished")  # the summary's order
TERMS = {"contr": "L", "align": "al", "unif": "un"}  # loss terms as metrics.jsonl names them, and as shown
# The layouts tried, one line per row first, until one fits the console: (the name's width, the
# state's), each row over a few lines; 0: the name whole, None: the state's words on one line.
LAYOUTS = ((0, None), (0, 11), (0, 9), (24, 9), (20, 9), (16, 9), (12, 9))
HEAD = ("state", "epoch", "img/s", "ETA", "loss", "top-1")


# ---------------------------------------------------------------- one run directory


@dataclass
class Progress:
    """What one run directory (a pretraining or a probe) says about itself."""

    path: Path
    status: dict[str, Any]
    epochs: int | None  # planned (config.toml)
    done: int  # epochs completed
    fraction: float  # of the epoch in progress
    images_per_s: float | None
    epoch_seconds: float | None  # measured, for the ETA
    terms: dict[str, float | None]  # the latest logged loss terms
    updated: float | None  # when metrics.jsonl or status.json last changed
    top1: float | None  # a probe's best top-1

    @property
    def state(self) -> str | None:
        return self.status.get("state")


def read_progress(path: Path, notes: list[str]) -> Progress | None:
    """The directory's progress, or None when it holds no run (yet)."""
    run = RunDir(path)
    if not path.is_dir():
        return None
    status = report.read_json(run.status, notes, missing_ok=True) or {}
    config = _read_config(run.config, notes)
    if not status and not config and not run.metrics.exists():
        return None
    manifest = report.read_json(run.manifest, notes, missing_ok=True) or {}
    results = report.read_json(path / "results.json", notes, missing_ok=True) or {}
    if not str(results.get("format", "")).startswith(report.RESULTS_FORMAT):
        results = {}
    records = tail_records(run.metrics)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    steps = [r for r in records if r.get("kind") == "step"]
    optim = config.get("optim") or {}

    done = max([_int(status.get("epoch")) or 0, _int(results.get("epochs_done")) or 0]
               + [(_int(r.get("epoch")) or 0) + 1 for r in epochs[-1:]])
    batch = _int(manifest.get("global_batch")) or _int(optim.get("batch_size"))
    images = _int((manifest.get("dataset") or {}).get("images"))
    per_epoch = images // batch if images and batch else None  # steps: the sampler drops the last partial batch
    speeds = [s for s in (report.number(r.get("images_per_s")) for r in epochs[-RECENT_EPOCHS:]) if s]
    step_speed = report.number(steps[-1].get("images_per_s")) if steps else None
    if report.number(results.get("wall_time_s")) and results.get("epochs_done"):
        epoch_seconds = results["wall_time_s"] / results["epochs_done"]  # a probe's, its evaluation included
    elif per_epoch and (speeds or step_speed):
        epoch_seconds = per_epoch * batch / (sum(speeds) / len(speeds) if speeds else step_speed)
    else:
        epoch_seconds = None
    stamps = [p.stat().st_mtime for p in (run.metrics, run.status) if p.exists()]
    top1 = report.Entry(path / "results.json", results, None, None).best_top1 if results else None
    return Progress(path, status, _int(optim.get("epochs")), done, _fraction(status, steps, done, per_epoch),
                    speeds[-1] if speeds else step_speed, epoch_seconds, _last_terms(records),
                    max(stamps) if stamps else None, top1)


def _fraction(status: dict[str, Any], steps: list[dict[str, Any]], done: int, per_epoch: int | None) -> float:
    """How much of the epoch in progress is done: its last logged step while running, else status.json's."""
    if not per_epoch:
        return 0.0
    at = status.get("step_in_epoch")
    if status.get("state") == "running":
        last = next((r for r in reversed(steps) if _int(r.get("epoch")) == done), {})
        at = last.get("step_in_epoch")
    return min(max((_int(at) or 0) / per_epoch, 0.0), 0.99)


def _last_terms(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """The loss terms of the last step or epoch record (a probe's: its cross-entropy, as "loss")."""
    last = next((r for r in reversed(records) if r.get("kind") in ("step", "epoch")), None)
    if last is None:
        return {}
    terms = {k: report.number(last[k]) for k in TERMS if k in last}
    if not terms and ("loss" in last or "train_loss" in last):
        terms = {"loss": report.number(last.get("loss", last.get("train_loss")))}
    return terms


def tail_records(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The records at the end of a metrics.jsonl (a long run's file is read only from its last
    ``max_bytes``); a line cut short, by the cut or by a crash, is skipped."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > max_bytes:
        lines = lines[1:]  # the first line is a fragment
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_config(path: Path, notes: list[str]) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        notes.append(f"cannot read {report.shown_path(path)}: {exc}.")
        return {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ---------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the status: a sweep's cell, a run, or a probe directory given alone."""

    name: str
    kind: str  # "cell", "run" or "probe"
    path: Path  # the pretraining run directory (a probe directory given alone: its own)
    state: str  # one of STATES
    phase: str | None = None  # "pretrain" or "probe"
    epoch: int | None = None  # of the phase, completed
    epochs: int | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    terms: dict[str, float | None] = field(default_factory=dict)
    top1: dict[str, float] = field(default_factory=dict)  # probe name -> best top-1
    probe: Path | None = None  # a cell's probe directory
    sweep: Path | None = None
    job: str | None = None  # the last job's id
    executor: str | None = None
    job_state: str | None = None  # squeue's word for it
    signal: str | None = None  # that stopped the run
    reason: str | None = None  # why it failed
    idle_s: float | None = None  # flagged: seconds since the directory last changed
    no_probe_yet: bool = False  # a cell stopped between its pretraining and its probe

    @property
    def extra(self) -> str | None:
        """What the state needs said beside it, short: the signal, the silence, the missing probe."""
        if self.idle_s is not None:
            return f"no update for {age(self.idle_s)}"
        if self.no_probe_yet:
            return "no probe yet"
        return self.signal


@dataclass
class Status:
    rows: list[Row]
    notes: list[str]
    time: float

    @property
    def done(self) -> bool:
        return all(r.state in DONE for r in self.rows)


def job_activity(job: dict[str, Any] | None, squeue: dict[str, str] | None) -> str | None:
    """queued / running (the job is active), ended, unknown, or None for no job.

    ``squeue``: squeue's states of the SLURM jobs it lists, None when it could not be asked.
    """
    if not job:
        return None
    if job.get("executor") == "slurm":
        if squeue is None:
            return "unknown"
        state = squeue.get(str(job.get("id")))
        return slurm.describe(state) if slurm.is_active(state) else "ended"
    if job.get("host") not in (None, os.uname().nodename):
        return "unknown"
    alive = pid_alive(job.get("pid"))
    return "unknown" if alive is None else "running" if alive else "ended"


def pid_alive(pid: Any) -> bool | None:
    """Whether a process of this host is alive (a zombie is not); None when ``pid`` is no pid."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cell_row(cell: plans.Cell, sweep: Path, name: str, squeue: dict[str, str] | None, notes: list[str],
             now: float) -> Row:
    """A sweep cell's row, by the rules of the module docstring."""
    run, probe_dir = cell_dirs(cell, sweep)
    pre, probe = read_progress(run, notes), read_progress(probe_dir, notes)
    job = cell.last_job or {}
    activity = job_activity(cell.last_job, squeue)
    row = Row(name, "cell", run, "", probe=probe_dir, sweep=sweep, job=_job_id(job), executor=job.get("executor"),
              job_state=(squeue or {}).get(str(job.get("id"))) if job.get("executor") == "slurm" else None)
    pre_epochs = (pre.epochs if pre else None) or _int((cell.config.get("optim") or {}).get("epochs"))
    probe_epochs = (probe.epochs if probe else None) or planned_probe_epochs(tuple(map(tuple, cell.commands)),
                                                                            cell.probe_preset)
    in_probe = (probe is not None and probe.state is not None) or (pre is not None and pre.state == "finished")
    current = probe if in_probe else pre
    row.phase, row.epochs = ("probe", probe_epochs) if in_probe else ("pretrain", pre_epochs)
    # the directory that decides when no job does: the probe's once it has a status, else the pretraining's
    said = next((p for p in (probe, pre) if p is not None and p.state), None)

    if probe is not None and probe.state == "finished":
        row.state = "finished"
    elif activity in ("queued", "running"):
        row.state = activity
        if job.get("executor") == "local" and not any(p is not None and p.state == "running" for p in (pre, probe)):
            row.state = "queued"  # its process waits for the cells before it
    elif said is not None:
        row.state = _known(said.state)
        if said is pre and pre.state == "finished":
            row.state, row.no_probe_yet = "stopped", True
    else:
        row.state = {None: "not started", "ended": "failed", "unknown": "submitted"}[activity]
        if activity == "ended":
            row.reason = f"its job {row.job} ended before the run started"
            notes.append(f"{name}: {row.reason} (its log says why).")
    if said is not None and row.state in ("stopped", "failed") and not row.no_probe_yet:
        row.signal, row.reason = said.status.get("signal"), said.status.get("reason")
    if row.state == "running" and activity not in ("queued", "running"):
        row.idle_s = _idle(current, now, flag_now=activity == "ended")

    row.epoch = current.done if current is not None else 0
    row.images_per_s = current.images_per_s if current is not None else None
    row.terms = pre.terms if pre is not None else {}
    if probe is not None and probe.top1 is not None:
        row.top1 = {probe_dir.name: probe.top1}
    if row.state in ("queued", "running"):
        row.eta_s = cell_eta(pre, probe, pre_epochs, probe_epochs, in_probe)
    if said is not None:
        _failure_note(row, notes)
    return row


def cell_dirs(cell: plans.Cell, sweep: Path) -> tuple[Path, Path]:
    """The cell's run and probe directories: the plan's, or in the sweep folder if it moved since."""
    run, probe = Path(cell.run), Path(cell.probe)
    if not run.exists() and (sweep / cell.id).is_dir():
        return sweep / cell.id, sweep / cell.id / "lincls" / cell.probe_preset
    return run, probe


def cell_eta(pre: Progress | None, probe: Progress | None, pre_epochs: int | None, probe_epochs: int | None,
             in_probe: bool) -> float | None:
    """Seconds of work left in a cell: its pretraining's epochs, then its probe's (see the module docstring)."""
    per_pre = pre.epoch_seconds if pre is not None else None
    left = 0.0
    if not in_probe:
        if per_pre is None or pre_epochs is None:
            return None
        left += max(pre_epochs - pre.done - pre.fraction, 0) * per_pre
    per_probe = probe.epoch_seconds if probe is not None and probe.epoch_seconds else \
        (per_pre * PROBE_EPOCH_SHARE if per_pre else None)
    if per_probe is None or probe_epochs is None:
        return None
    probe_left = probe_epochs - (probe.done + probe.fraction if probe is not None else 0)
    return left + max(probe_left, 0) * per_probe


def phase_eta(progress: Progress) -> float | None:
    if progress.epoch_seconds is None or progress.epochs is None:
        return None
    return max(progress.epochs - progress.done - progress.fraction, 0) * progress.epoch_seconds


@functools.cache
def planned_probe_epochs(commands: tuple[tuple[str, ...], ...], probe_preset: str) -> int | None:
    """The probe's epochs from the cell's `mauctl lincls` command line, as that command would resolve them."""
    from mauctl.config import load_config

    argv = next((list(c[1:]) for c in commands if c and c[0] == "lincls"), [])
    options: dict[str, list[str]] = {}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--preset", "--epochs", "--set", "--config"):
            options.setdefault(name, []).append(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
    try:
        epochs = options.get("--epochs", [None])[-1]
        config = load_config("lincls", preset=options.get("--preset", [probe_preset])[-1],
                             config_file=Path(options["--config"][-1]) if "--config" in options else None,
                             flags={"optim.epochs": int(epochs) if epochs else None}, sets=options.get("--set", []),
                             environ={}).config
    except (MauctlError, ValueError, OSError):
        return None
    return config.optim.epochs


def run_row(path: Path, notes: list[str], now: float) -> Row:
    """A run that is no sweep's cell: its pretraining, then whichever of its probes runs."""
    name = report.shown_path(path)
    pre = read_progress(path, notes)
    probes = {}
    if (path / "lincls").is_dir():
        for folder in sorted(p for p in (path / "lincls").iterdir() if p.is_dir()):
            progress = read_progress(folder, notes)
            if progress is not None:
                probes[folder.name] = progress
    row = Row(name, "run", path, "not started", phase="pretrain")
    row.top1 = {n: p.top1 for n, p in probes.items() if p.top1 is not None}
    if pre is None:
        return row
    row.terms, current = pre.terms, pre
    if pre.state == "finished":
        running = [p for p in probes.values() if p.state == "running"]
        row.state = "running" if running else "finished"
        if running:
            current, row.phase = running[0], "probe"
        for probe_name, p in probes.items():
            if p.state in ("stopped", "failed"):
                notes.append(f"{name}: probe {probe_name} {p.state} at epoch {p.done}/{p.epochs or '?'}"
                             + (f" ({p.status.get('signal') or p.status.get('reason')})"
                                if p.status.get("signal") or p.status.get("reason") else "") + ".")
    else:
        row.state = _known(pre.state)
        row.signal, row.reason = pre.status.get("signal"), pre.status.get("reason")
    _fill_phase(row, current, now)
    _failure_note(row, notes)
    return row


def probe_row(path: Path, notes: list[str], now: float) -> Row:
    """A probe directory (<run>/lincls/<name>, or a probe's --out) given by itself."""
    progress = read_progress(path, notes)
    row = Row(report.shown_path(path), "probe", path, "not started", phase="probe")
    if progress is None:
        return row
    row.state = _known(progress.state)
    row.signal, row.reason = progress.status.get("signal"), progress.status.get("reason")
    row.terms = progress.terms
    if progress.top1 is not None:
        row.top1 = {path.name: progress.top1}
    _fill_phase(row, progress, now)
    _failure_note(row, notes)
    return row


def _known(state: str | None) -> str:
    """A status.json's state as a row's: none yet is not started; one this version does not know, failed."""
    return "not started" if state is None else state if state in STATES else "failed"


def _fill_phase(row: Row, current: Progress, now: float) -> None:
    row.epoch, row.epochs, row.images_per_s = current.done, current.epochs, current.images_per_s
    if row.state == "running":
        row.eta_s = phase_eta(current)
        row.idle_s = _idle(current, now, flag_now=False)  # no job is known for a run outside the sweeps


def _idle(progress: Progress | None, now: float, flag_now: bool) -> float | None:
    """Seconds since ``progress``'s directory last changed, when that is a flag (see the module docstring)."""
    if progress is None or progress.updated is None:
        return None
    idle = max(now - progress.updated, 0.0)
    return idle if flag_now or idle > STALE_AFTER else None


def _failure_note(row: Row, notes: list[str]) -> None:
    if row.state == "failed" and row.reason:
        where = f" at epoch {row.epoch + 1}" if row.epoch is not None and row.epochs and row.epoch < row.epochs \
            else ""
        notes.append(f"{row.name}: {row.phase or 'run'} failed{where}: {row.reason}")


def _job_id(job: dict[str, Any]) -> str | None:
    return None if job.get("id") is None else str(job["id"])


# ---------------------------------------------------------------- collect


def collect(paths: Sequence[Path], *, now: float | None = None,
            job_states: Callable[[list[str]], dict[str, str]] = slurm.job_states) -> Status:
    """The status of every sweep cell and run under ``paths`` (run directories, sweep folders or folders to
    scan; default runs/). A path that is none of these is a UsageError naming it."""
    now = time.time() if now is None else now
    notes: list[str] = []
    if not paths:
        if not Path("runs").is_dir():
            notes.append(f"no runs/ folder in {Path.cwd()}; give run directories, sweep folders or folders to scan.")
            return Status([], notes, now)
        paths = [Path("runs")]
    sweeps, runs, probes = find(paths)
    read = [(sweep, plans.read_plan(sweep)) for sweep in sweeps]
    read = [(sweep, plan) for sweep, plan in read if plan is not None]
    # squeue is asked about the jobs of the cells not finished (rule 1 needs none), and only when there are some
    slurm_ids = sorted({str(c.last_job["id"]) for sweep, p in read for c in p.cells.values()
                        if c.last_job and c.last_job.get("executor") == "slurm" and c.last_job.get("id") is not None
                        and RunDir(cell_dirs(c, sweep)[1]).read_status().get("state") != "finished"})
    squeue: dict[str, str] | None = {}
    if slurm_ids:
        try:
            squeue = job_states(slurm_ids)
        except slurm.SlurmUnavailable as exc:
            squeue = None
            notes.append(f"squeue failed ({exc}): the SLURM jobs' cells show what their run directories last said.")
    rows, cells = [], set()
    for sweep, plan in read:
        for cell in plan.cells.values():
            name = cell.id if len(read) == 1 else report.shown_path(Path(cell.run))
            row = cell_row(cell, sweep, name, squeue, notes, now)
            cells.add(row.path.resolve())
            rows.append(row)
    loose = sorted((r for r in runs if r.resolve() not in cells), key=report.shown_path)
    rows += [run_row(run, notes, now) for run in loose]
    rows += [probe_row(probe, notes, now) for probe in probes]
    if not rows:
        notes.append("no runs or sweeps under " + ", ".join(str(p) for p in paths) + ".")
    return Status(rows, notes, now)


def find(paths: Sequence[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """The sweep folders, pretraining run directories and probe directories under ``paths``."""
    bad = [str(p) for p in paths if not p.is_dir() and not (p.name == plans.PLAN_FILE and p.is_file())]
    if bad:
        raise UsageError("not a run directory, sweep folder or folder to scan: " + ", ".join(bad),
                         hint="Give run directories, sweep folders (with sweep.json) or folders that hold them "
                              "(default: runs/).")
    sweeps: list[Path] = []
    runs: list[Path] = []
    probes: list[Path] = []
    for path in paths:
        path = path.parent if path.is_file() else path
        if report.is_run(path):
            runs.append(path)
        elif is_probe(path):
            probes.append(path)
        else:
            _scan(path, sweeps, runs)
    return _unique(sweeps), _unique(runs), _unique(probes)


def is_probe(path: Path) -> bool:
    """A probe's directory: the files of a run, written by `mauctl lincls`."""
    manifest = path / "manifest.json"
    if not ((path / "config.toml").is_file() and manifest.is_file()):
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("command") == "lincls"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _scan(root: Path, sweeps: list[Path], runs: list[Path]) -> None:
    for here, filenames, run in report.walk(root):
        if plans.PLAN_FILE in filenames:
            sweeps.append(here)  # and its folder may hold runs of its own besides the cells
        if run:
            runs.append(here)


def _unique(paths: list[Path]) -> list[Path]:
    seen: dict[Path, Path] = {}
    for p in paths:
        seen.setdefault(p.resolve(), p)
    return list(seen.values())


# ---------------------------------------------------------------- the words and numbers shown


def age(seconds: float) -> str:
    """How long ago, coarsely: ``<1 min``, ``12 min``, ``3 h``, ``2 d``."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "<1 min"
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h" if hours < 48 else f"{hours // 24} d"


def short_duration(seconds: float | None) -> str:
    """``45s``, ``12m``, ``5h07m``, ``31h``, ``3d04h``, ``12d``: at most five characters."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    hours, days = s // 3600, s // 86400
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if hours < 10:
        return f"{hours}h{s % 3600 // 60:02d}m"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d{s % 86400 // 3600:02d}h" if days < 10 else f"{days}d"


def _value(v: float | None) -> str:
    if v is None:
        return "nan"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


def term_texts(row: Row) -> list[str]:
    """``["al 0.52", "un -3.41"]``, ``["L 6.91"]``."""
    return [f"{TERMS.get(k, 'loss')} {_value(v)}" for k, v in row.terms.items()]


def state_words(row: Row) -> list[str]:
    """The state, then the job id, then what needs saying beside it (``extra``)."""
    return [row.state] + ([row.job] if row.job else []) + ([row.extra] if row.extra else [])


def state_text(row: Row) -> str:
    """One line: ``running 4242_0``, ``stopped (SIGUSR1)``, ``running (no update 3 h)``."""
    return " ".join([row.state] + ([row.job] if row.job else [])) + (f" ({row.extra})" if row.extra else "")


def epoch_text(row: Row) -> str:
    if row.phase is None or row.epoch is None:
        return "-"
    return f"{row.epoch}/{row.epochs if row.epochs is not None else '?'}"


def speed_text(row: Row) -> str:
    return "-" if row.images_per_s is None else f"{row.images_per_s:.0f}"


def top1_texts(row: Row) -> list[str]:
    if not row.top1:
        return ["-"]
    if len(row.top1) == 1:
        return [f"{v:.2f}" for v in row.top1.values()]
    return [f"{v:.2f} {name}" for name, v in row.top1.items()]


def name_lines(name: str, width: int) -> list[str]:
    """``name`` on lines of at most ``width`` characters, broken only before a "_" or after a "/" (a cell id's
    preset, loss and seed; a path's folders), never within a word: a longer piece keeps a line of its own."""
    pieces, piece = [], ""
    for ch in name:
        if ch == "_" and piece:
            pieces.append(piece)
            piece = ""
        piece += ch
        if ch == "/":
            pieces.append(piece)
            piece = ""
    if piece:
        pieces.append(piece)
    lines: list[str] = []
    for piece in pieces:
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return lines or [""]


def summary(status: Status) -> str:
    """``30 cells: 4 running, 2 queued, 24 finished``."""
    kinds = Counter(r.kind for r in status.rows)
    what = ", ".join(plural(kinds[k], k) for k in ("cell", "run", "probe") if kinds[k])
    counts = Counter(r.state for r in status.rows)
    return f"{what}: " + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])


# ---------------------------------------------------------------- render


def status_table(status: Status, layout: tuple[int, int | None] | None = None) -> Table:
    """One line per row without a ``layout``; with one (see LAYOUTS), each row over a few lines: the name
    broken before a "_" or after a "/" at its width (0: whole), the job id and what the state needs said
    under the state (its words wrapped at its width), the epochs under the phase, one loss term a line."""
    lines = layout is not None
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("cell" if all(r.kind == "cell" for r in status.rows) else "run", no_wrap=True)
    for head in HEAD:
        table.add_column(head, justify="right" if head in ("img/s", "ETA", "top-1") else "left", no_wrap=True)
    for row in status.rows:
        if lines:
            name_width, state_width = layout
            name = "\n".join(name_lines(row.name, name_width)) if name_width else row.name
            state = [w for line in state_words(row) for w in
                     (textwrap.wrap(line, state_width, break_long_words=False) if state_width else [line])]
            cells = [name, "\n".join(state),
                     f"{row.phase}\n{epoch_text(row)}" if row.phase else "-", speed_text(row),
                     short_duration(row.eta_s), "\n".join(term_texts(row)) or "-", "\n".join(top1_texts(row))]
        else:
            cells = [row.name, state_text(row), f"{row.phase} {epoch_text(row)}" if row.phase else "-",
                     speed_text(row), short_duration(row.eta_s), " ".join(term_texts(row)) or "-",
                     ", ".join(top1_texts(row))]
        table.add_row(*(Text(c) for c in cells))
    return table


def fitted_table(status: Status, console: Console) -> Table:
    """The one-line-per-row table when it fits the console, else the narrowest layout that does (at 80
    columns, rows of two or three lines). Where none does, rich folds the widest cells: nothing is cut."""
    for layout in (None, *LAYOUTS):
        table = status_table(status, layout)
        if fits(console, table):
            return table
    for column in table.columns:
        column.no_wrap, column.overflow = False, "fold"
    return table


def render_rich(status: Status, console: Console) -> None:
    """The table, a line counting the states, and the notes (wrapped, in a pipe too)."""
    if status.rows:
        console.print(fitted_table(status, console))
        paragraph(console, summary(status))
    for note in status.notes:
        paragraph(console, f"note: {note}")


def rich_group(status: Status, console: Console, footer: str) -> RenderableType:
    """What --watch redraws in a terminal."""
    parts: list[RenderableType] = []
    if status.rows:
        parts += [fitted_table(status, console), Text(summary(status))]
    parts += [Text(f"note: {n}") for n in status.notes] + [Text(footer, style="dim")]
    return Group(*parts)


def render_markdown(status: Status) -> str:
    lines = []
    if status.rows:
        head = ["cell" if all(r.kind == "cell" for r in status.rows) else "run", *HEAD]
        lines += [_md_row(head), "|---|---|---|--:|--:|---|--:|"]
        for row in status.rows:
            lines.append(_md_row([row.name, state_text(row), f"{row.phase} {epoch_text(row)}" if row.phase else "-",
                                  speed_text(row), short_duration(row.eta_s), " ".join(term_texts(row)) or "-",
                                  ", ".join(top1_texts(row))]))
        lines += ["", summary(status)]
    if status.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in status.notes]
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def row_data(row: Row) -> dict[str, Any]:
    top1 = next(iter(row.top1.values())) if len(row.top1) == 1 else row.top1.get("lincls")
    return {"name": row.name, "kind": row.kind, "state": row.state, "job": row.job, "executor": row.executor,
            "job_state": row.job_state, "phase": row.phase, "epoch": row.epoch, "epochs": row.epochs,
            "images_per_s": row.images_per_s, "eta_s": row.eta_s, "losses": row.terms, "top1": top1,
            "probes": row.top1, "signal": row.signal, "reason": row.reason, "idle_s": row.idle_s,
            "no_probe_yet": row.no_probe_yet, "run": os.path.abspath(row.path),
            "probe": os.path.abspath(row.probe) if row.probe else None,
            "sweep": os.path.abspath(row.sweep) if row.sweep else None}


def status_data(status: Status) -> dict[str, Any]:
    return {"format": STATUS_FORMAT, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(status.time)),
            "rows": [row_data(r) for r in status.rows], "summary": summary(status) if status.rows else "",
            "notes": status.notes}


def render_json(status: Status, indent: int | None = 2) -> str:
    return json.dumps(status_data(status), indent=indent) + "\n"


def rendered(status: Status, fmt: str, console: Console, one_line_json: bool = False) -> str:
    """The status as text, as ``fmt`` writes it to ``console`` (its width; no styles)."""
    if fmt == "json":
        return render_json(status, None if one_line_json else 2)
    if fmt == "markdown":
        return render_markdown(status)
    buffer = io.StringIO()
    render_rich(status, Console(file=buffer, width=console.width, color_system=None, force_terminal=False,
                                soft_wrap=True))
    return buffer.getvalue()


# ---------------------------------------------------------------- the command


def run_status(paths: Sequence[Path], *, fmt: str = "rich", watch: bool = False, interval: float = 10.0,
               console: Console | None = None, sleep: Callable[[float], None] = time.sleep) -> Status:
    """What `mauctl status` does: collect and print once, or with ``watch`` again every ``interval``
    seconds until every row is finished or failed, or Ctrl-C (which ends it quietly). Returns the last status."""
    console = console or Console()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of " + ", ".join(FORMATS))
    if interval <= 0:
        raise UsageError(f"--interval {interval:g}: expected a number of seconds above 0")
    status = collect(paths)
    if not watch:
        if fmt == "rich":
            render_rich(status, console)
        else:
            console.file.write(rendered(status, fmt, console))
            console.file.flush()
        return status
    try:
        if fmt == "rich" and console.is_terminal:
            return _watch_live(paths, status, interval, console, sleep)
        return _watch_lines(paths, status, fmt, interval, console, sleep)
    except KeyboardInterrupt:
        return status


def _watch_live(paths: Sequence[Path], status: Status, interval: float, console: Console,
                sleep: Callable[[float], None]) -> Status:
    """A terminal: the table redrawn in place."""
    from rich.live import Live

    with Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            footer = (f"{time.strftime('%H:%M:%S', time.localtime(status.time))}; "
                      + ("every row is finished or failed" if status.done
                         else f"every {interval:g} s; Ctrl-C to stop"))
            live.update(rich_group(status, console, footer), refresh=True)
            if status.done:
                return status
            sleep(interval)
            status = collect(paths)


def _watch_lines(paths: Sequence[Path], status: Status, fmt: str, interval: float, console: Console,
                 sleep: Callable[[float], None]) -> Status:
    """A pipe or a file: the status again only when it changed (JSON: one object per line)."""
    last = None
    while True:
        shown = render_markdown(status)  # what changes what is shown (not the clock, nor idle seconds)
        if shown != last:
            text = rendered(status, fmt, console, one_line_json=True)
            if fmt != "json":
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.time))
                text = ("\n" if last is not None else "") + f"status at {when}\n{text}"
            console.file.write(text)
            console.file.flush()
            last = shown
        if status.done:
            return status
        sleep(interval)
        status = collect(paths)
