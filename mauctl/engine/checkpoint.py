"""Checkpoints: what they hold, when they are written, how a run resumes; never half-written, never run code.

What a checkpoint holds (a dict; ``torch.load(path, weights_only=True)`` reads it)::

    format          PRETRAIN_FORMAT or LINCLS_FORMAT
    epoch           epochs completed: training goes on with this (0-based) epoch
    step_in_epoch   steps of that epoch already done (0 at an epoch's end)
    global_step     steps since the start of the run
    epoch_sums      the epoch's logged terms summed over its steps so far, and
    epoch_count     how many steps those sums cover (an epoch resumed mid-way reports its true means)
    optimizer       optimizer.state_dict()
    scaler          the AMP GradScaler's state_dict() (empty unless fp16; a resume in another precision
                    starts the loss scale afresh, see ``restore``)
    config          the resolved config (model_dump())

    pretraining (``Checkpointer`` parts and facts of pretrain.py):
    encoder_q, encoder_k   the query and key encoders' state_dicts (torchvision key names)
    queue                  {"keys": (K, dim) tensor, "_extra_state": the write pointer}
    arch, world_size, bn_splits

    linear probe (lincls.py):
    model          the frozen backbone and its trained classifier (torchvision key names)
    source         the encoder probed: {"source", "path", "run_dir", "arch", "small_stem", "epoch", ...}
    history        one record per epoch: {"epoch", "top1", "top5", "train_loss", "train_acc1", "lr"}
    summary        {"best_top1", "best_epoch"}
    wall_time_s    the probe's time so far

No RNG states, yet a resumed run draws exactly what an uninterrupted one would: once the model is
initialised (weights the checkpoint then replaces), every random draw comes from a generator seeded
with ``derive_seed(seed, ...)`` of where the run stands: each epoch's order (loader.EpochSampler),
each image's augmentation (loader.SeededImages, batch_augment.TensorViews: per (epoch, image)), the
shuffled keys (pretrain.py: per (epoch, step)), the cached probe's order and views (lincls.py). The
DataLoader seeds its workers from torch's global RNG, but nothing in them draws from it unseeded.
Checkpoints of earlier versions hold an ``rng`` entry; nothing reads it.

weights.py reads these files for lincls and export; ``upgrade`` reads an older layout.

When a checkpoint is written (``Checkpointer``): ``last.pt`` at the end of every epoch (a probe on
cached features, whose epochs take milliseconds, only at a best epoch, the last one, and once a
minute), within an epoch once ``run.save_minutes`` have passed (checked at logging steps), and
when the run stops on a signal; ``epoch_NNNN.pt`` every ``run.save_every`` epochs and ``best.pt`` at
a probe's best epoch are second names (hard links) of that ``last.pt``.

Save: ``files.replaced_atomically`` (a temporary file beside the target, fsync, ``os.replace``).
A crash at any point leaves either the old file or the new one, never a partial one under the
real name; a write that fails (full disk, lost permission) is a RunError that names the file and
keeps the previous one. Load: ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mauctl import files
from mauctl.engine import faults
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import restarted
from mauctl.errors import RunError
from mauctl.text import plural

PRETRAIN_FORMAT = "mauctl.pretrain/2"
LINCLS_FORMAT = "mauctl.lincls/1"
PRETRAIN_FORMATS = ("mauctl.pretrain/1", PRETRAIN_FORMAT)  # /1: the queue as two top-level keys
WHAT = {PRETRAIN_FORMAT: "pretraining", LINCLS_FORMAT: "linear-probe"}
PARTIAL = re.compile(r"\..+\.pt\.[^.]+\.(tmp|link)")  # save_atomic's and keep_copy's temporary names
CACHED_SAVE_SECONDS = 60.0  # a probe on cached features writes last.pt at most this often between bests


def upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an older layout in today's (``mauctl.pretrain/1``: queue and queue_ptr apart)."""
    if ckpt.get("format") == "mauctl.pretrain/1" and "queue_ptr" in ckpt:
        ckpt = {**ckpt, "format": PRETRAIN_FORMAT,
                "queue": {"keys": ckpt["queue"], "_extra_state": int(ckpt["queue_ptr"])}}
        del ckpt["queue_ptr"]
    return ckpt


# ---------------------------------------------------------------- the state of a run


@dataclass
class TrainState:
    """Where a run stands besides its weights: the position to resume at and the epoch's running sums."""

    epoch: int = 0  # epochs completed, i.e. the (0-based) epoch in progress
    step_in_epoch: int = 0  # steps of that epoch done
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # the epoch's logged terms, summed over its steps
    count: int = 0  # steps in those sums

    def start_epoch(self, epoch: int) -> int:
        """Enter ``epoch``; the step it starts at: the saved one for the epoch resumed in, else 0 (fresh sums)."""
        first = self.step_in_epoch if epoch == self.epoch else 0
        self.epoch, self.step_in_epoch = epoch, first
        if first == 0:
            self.sums, self.count = {}, 0
        return first

    def finish_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def accumulate(self, values: Mapping[str, float], count: int) -> None:
        """Add an interval's means (over ``count`` steps) to the epoch's running sums."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * count
        self.count += count

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def to_checkpoint(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "epoch_sums": dict(self.sums), "epoch_count": self.count}

    def load(self, ckpt: Mapping[str, Any]) -> None:
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        self.global_step = int(ckpt["global_step"])
        self.sums, self.count = dict(ckpt.get("epoch_sums", {})), int(ckpt.get("epoch_count", 0))


@dataclass
class ProbeState(TrainState):
    """A linear probe's state: the run's, and its per-epoch accuracies, best epoch and time."""

    best_top1: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0

    def end_epoch(self, top1: float, top5: float, lr: float) -> bool:
        """Record the epoch's accuracies and training means, and finish it; whether it is the best so far."""
        means = self.means()
        self.history.append({"epoch": self.epoch + 1, "top1": top1, "top5": top5, "train_loss": means.get("loss"),
                             "train_acc1": means.get("acc1"), "lr": lr})
        best = top1 > self.best_top1
        if best:
            self.best_top1, self.best_epoch = top1, self.epoch + 1
        self.finish_epoch()
        return best

    def to_checkpoint(self) -> dict[str, Any]:
        return {**super().to_checkpoint(), "history": list(self.history), "wall_time_s": self.wall_time_s,
                "summary": {"best_top1": self.best_top1, "best_epoch": self.best_epoch}}

    def load(self, ckpt: Mapping[str, Any]) -> None:
        super().load(ckpt)
        summary = ckpt.get("summary", {})
        self.best_top1, self.best_epoch = float(summary.get("best_top1", -1.0)), int(summary.get("best_epoch", 0))
        self.history, self.wall_time_s = list(ckpt.get("history", [])), float(ckpt.get("wall_time_s", 0.0))


# ---------------------------------------------------------------- the checkpointer


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Checkpointer:
    """One run's checkpoints (see the module docstring): resume, and write when due.

    ``parts`` are saved under their names (state_dict) and restored on resume; ``facts`` are written
    as they are (what readers of the file need: the architecture, the probe's source). Rank 0
    writes; every rank learns whether the write worked, so all go on or all stop together.
    """

    def __init__(self, run: RunDir, runtime: Any, fmt: str, config: Any, parts: Mapping[str, Stateful],
                 facts: Mapping[str, Any] | None = None, *, save_every: int = 0, save_minutes: float = 0.0,
                 keep_best: bool = False, every_epoch: bool = True) -> None:
        self.run, self.rt, self.fmt, self.config = run, runtime, fmt, config
        self.parts, self.facts = dict(parts), dict(facts or {})
        self.save_every, self.keep_best, self.every_epoch = save_every, keep_best, every_epoch
        self.clock = SaveClock(save_minutes, runtime)
        self.written_at: tuple[int, int] | None = None  # (epoch, step_in_epoch) of the last write
        self.written_time = time.monotonic()

    def resume(self, state: TrainState, resume: str) -> Path | None:
        """Load the checkpoint to go on from into the parts and ``state``; its path, or None for a new run."""
        path, ckpt = resume_checkpoint(self.run, resume, self.rt, self.fmt)
        if path is None:
            return None
        try:
            for name, part in self.parts.items():
                restore(part, ckpt[name])
            state.load(ckpt)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{path} does not fit this run (model.* settings differ?): {exc}") from None
        self.written_at = (state.epoch, state.step_in_epoch)
        return path

    def save(self, state: TrainState, best: bool = False) -> None:
        """Write last.pt now, with its kept copies (epoch_NNNN.pt every save_every epochs, best.pt)."""
        def write() -> None:
            save_atomic({"format": self.fmt, **state.to_checkpoint(),
                         **{name: part.state_dict() for name, part in self.parts.items()},
                         "config": self.config.model_dump(), **self.facts}, self.run.last)
            if state.step_in_epoch == 0 and self.save_every and state.epoch % self.save_every == 0:
                keep_copy(self.run.last, self.run.kept_name(state.epoch))
            if best and self.keep_best:
                keep_copy(self.run.last, self.run.path / "best.pt", replace=True)

        save_on_main(self.rt, write)  # a failed write stops every rank together, the previous checkpoint kept
        self.clock.reset()
        self.written_at, self.written_time = (state.epoch, state.step_in_epoch), time.monotonic()

    def save_if_due(self, state: TrainState) -> None:
        """At a logging step within an epoch (the same step on every rank): write once run.save_minutes passed."""
        if self.clock.due():
            self.save(state)

    def end_epoch(self, state: TrainState, best: bool = False, final: bool = False) -> None:
        """After ``state.finish_epoch()``: write last.pt (see the module docstring for the cached probe)."""
        recent = time.monotonic() - self.written_time < CACHED_SAVE_SECONDS
        if self.every_epoch or best or final or not recent:
            self.save(state, best)

    def stopping(self, state: TrainState) -> None:
        """The run stops on a signal at ``state``'s position: write it, unless that is what was last written."""
        if self.written_at != (state.epoch, state.step_in_epoch):
            self.save(state)


def restore(part: Stateful, state: Any) -> None:
    """``part.load_state_dict(state)``, except where run.precision changed on resume (allowed).

    A GradScaler saves ``{}`` when disabled (any precision but fp16): an fp16 run resumed from it
    starts its loss scale afresh. (A disabled scaler ignores what an fp16 run saved.)
    """
    if isinstance(part, torch.amp.GradScaler) and not state:
        return
    part.load_state_dict(state)


def resume_checkpoint(run: RunDir, resume: str, runtime: Any, fmt: str) -> tuple[Path | None, dict | None]:
    """(path, checkpoint) to resume from, or (None, None): rank 0 picks, every rank reads the same file.

    Several nodes therefore need a shared run directory. A checkpoint of another format is refused.
    When torchrun restarted the workers after a failure, they go on from this run's own newest
    checkpoint, whatever ``resume`` says (a path, or "none", was meant for the first start).
    """
    path, ckpt, failure = None, None, None
    if runtime.is_main:
        if restarted() and run.has_checkpoint():
            resume = "auto"
        leftovers = remove_partial_files(run.checkpoints)
        if leftovers:
            print(f"removed {plural(len(leftovers), 'partial file')} left in {run.checkpoints} by an interrupted save: "
                  + ", ".join(p.name for p in leftovers))
        try:
            path, ckpt = pick(run, resume, log=print)
        except RunError as exc:
            failure = (exc.message, exc.hint)
    path, failure = runtime.broadcast_object((str(path) if path else None, failure))
    if failure:  # every rank stops with rank 0's reason, none waits for it
        raise RunError(failure[0], hint=failure[1])
    if path is None:
        return None, None
    ckpt = upgrade(ckpt if ckpt is not None else load(Path(path)))
    if ckpt.get("format") != fmt:
        raise RunError(f"{path} is not a mauctl {WHAT.get(fmt, fmt)} checkpoint (format {ckpt.get('format')!r})")
    return Path(path), ckpt


def pick(run: RunDir, resume: str, log: Callable[[str], None] = print) -> tuple[Path | None, dict | None]:
    """(path, checkpoint) to resume from: an explicit path, else last.pt, else the newest readable kept one."""
    if resume == "none":
        return None, None
    if resume != "auto":
        return Path(resume), load(Path(resume))
    candidates = ([run.last] if run.last.exists() else []) + run.kept()
    for path in candidates:
        try:
            return path, load(path)
        except RunError as exc:
            log(f"warning: {exc.message}; trying the previous checkpoint")
    if candidates:
        raise RunError(f"no readable checkpoint in {run.checkpoints}",
                       hint="Every candidate was corrupt; use --overwrite to start over (the old run is kept).")
    return None, None


def save_on_main(runtime: Any, save: Callable[[], None]) -> None:
    """Rank 0 runs ``save()``; every rank learns whether it worked, so all go on or all stop together."""
    failure = None
    if runtime.is_main:
        try:
            save()
        except RunError as exc:
            failure = (exc.message, exc.hint)
    failure = runtime.broadcast_object(failure)
    if failure:
        raise RunError(failure[0], hint=failure[1])


class SaveClock:
    """When a checkpoint within an epoch is due (run.save_minutes): rank 0's clock, so every rank agrees.

    Asked at logging steps, which are the same steps on every rank; ``reset`` after every write.
    """

    def __init__(self, minutes: float, runtime: Any, now: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.runtime, self.now = minutes * 60.0, runtime, now
        self.reset()

    def reset(self) -> None:
        self.last = self.now()

    def due(self) -> bool:
        return bool(self.seconds) and self.runtime.main_says(self.now() - self.last >= self.seconds)


# ---------------------------------------------------------------- files


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` whole or not at all; RunError (the old file intact) when the write fails."""
    try:
        with files.replaced_atomically(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            faults.during_save(f, str(tmp))
    except BaseException as exc:
        # torch.save may report a failed write as a RuntimeError of its zip writer
        cause = exc if isinstance(exc, OSError) else exc.__context__ if isinstance(exc.__context__, OSError) else None
        if cause is not None or (isinstance(exc, RuntimeError) and "inline_container" in str(exc)):
            raise save_failed(path, cause or exc) from None
        raise


def save_failed(path: Path, exc: BaseException) -> RunError:
    kept = "the previous checkpoint there is kept" if path.exists() else "no earlier checkpoint was there"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = f"Free some space where {path.parent} is (or move the run), then resume with the same command."
    elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"Make {path.parent} writable again, then resume with the same command."
    else:
        hint = "Fix the cause, then resume with the same command."
    return RunError(f"could not write the checkpoint {path}: {reason}; {kept}", hint=hint)


def keep_copy(last: Path, kept: Path, replace: bool = False) -> None:
    """``kept`` becomes a second name for ``last``'s bytes (hard link; a copy where links fail).

    An existing ``kept`` stays unless ``replace``; then it is replaced atomically.
    """
    if kept.exists() and not replace:
        return
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.link")
    try:
        os.link(last, tmp)
    except OSError:
        save_atomic(load(last), kept)
        return
    os.replace(tmp, kept)


def load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint without unpickling code; RunError with the reason when it cannot be read.

    ``mmap``: map the tensors instead of reading them (cheap to inspect a large file; zip format only).
    """
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        with warnings.catch_warnings():  # torch warns about any pickle protocol but 2 before refusing the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))  # the class or function the file would import
        name = named.group(1) if named else _pickled_callable(path)
        if name is None:  # torch's restricted unpickler met bytes that are no pickle at all
            raise RunError(f"{path} is not a readable checkpoint (not written by torch.save?)") from None
        raise RunError(
            f"{path} was refused: it contains objects other than tensors and plain data "
            f"(loading it would run code: it names {name})",
            hint="Only load checkpoints from sources you trust; mauctl never unpickles code.",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise RunError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from None
    except Exception as exc:  # a file that is no checkpoint at all makes the unpickler fail in any way
        raise RunError(f"{path} is not a readable checkpoint (not written by torch.save?): "
                       f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def _pickled_callable(path: Path) -> str | None:
    """The first class or function a plain pickle file would import, read with pickletools (nothing runs)."""
    import pickletools

    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle, or a broken one
        return None
    return None


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete what an interrupted save left in ``folder`` (``.<name>.*.tmp``, ``.<name>.*.link``); return them.

    Only mauctl writes these names, and nothing ever reads them; removing them gives the space back.
    """
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.iterdir() if PARTIAL.fullmatch(p.name)]
    for p in leftovers:
        with contextlib.suppress(OSError):
            p.unlink()
    return leftovers
