"""What every training loop (pretrain, lincls) shares: starting the run files, running sums of
the metrics without per-step host syncs, the non-finite check, and stopping on a signal."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mauctl import files
from mauctl.config import to_toml
from mauctl.engine.manifest import write_manifest
from mauctl.engine.progress import MetricsLog, Reporter
from mauctl.engine import checkpoint
from mauctl.engine.rundir import RunDir, pick_checkpoint
from mauctl.engine.runtime import restarted
from mauctl.engine.schedule import lr_at
from mauctl.errors import RunError


def start_run(run: RunDir, config: Any, runtime: Any, meta: dict[str, Any], index: Any, title: str,
              resumed_from: Any, state: dict[str, Any], **effective: Any) -> MetricsLog | None:
    """Rank 0: create the run directory, write config.toml, manifest.json, status, open metrics.jsonl."""
    if not runtime.is_main:
        return None
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        files.write_text_atomically(run.config, to_toml(config, f"Resolved by mauctl {title}; repeat the run with --config"))
        write_manifest(run, config, runtime, {**meta, "command": title}, index, resumed_from=resumed_from,
                       **effective)
        log = MetricsLog(run.metrics, run.path / "tensorboard" if config.run.tensorboard else None)
        if resumed_from:
            log.write({"kind": "resume", "from": str(resumed_from), "epoch": state["epoch"],
                       "step_in_epoch": state["step_in_epoch"], "world_size": runtime.world_size})
        run.set_status("running", epoch=state["epoch"], step_in_epoch=state["step_in_epoch"])
    except OSError as exc:
        raise RunError(f"cannot write the run directory {run.path}: {exc.strerror or exc}",
                       hint="Check its permissions and free space, then run the same command again.") from None
    return log


def resume_checkpoint(run: RunDir, resume: str, runtime: Any, fmt: str, what: str) -> tuple[Any, dict | None]:
    """(path, checkpoint) to resume from, or (None, None): rank 0 picks, every rank reads the same file.

    Several nodes therefore need a shared run directory. A checkpoint of another format is refused.
    When torchrun restarted the workers after a failure, they go on from this run's own newest
    checkpoint, whatever ``resume`` says (a path, or "none", was meant for the first start).
    """
    path, ckpt, failure = None, None, None
    if runtime.is_main:
        if restarted() and run.has_checkpoint():
            resume = "auto"
        leftovers = checkpoint.remove_partial_files(run.checkpoints)
        if leftovers:
            print(f"removed {len(leftovers)} partial file(s) left in {run.checkpoints} by an interrupted save: "
                  + ", ".join(p.name for p in leftovers))
        try:
            path, ckpt = pick_checkpoint(run, resume, log=print)
        except RunError as exc:
            failure = (exc.message, exc.hint)
    path, failure = runtime.broadcast_object((str(path) if path else None, failure))
    if failure:  # every rank stops with rank 0's reason, none waits for it
        raise RunError(failure[0], hint=failure[1])
    if path is None:
        return None, None
    if ckpt is None:
        ckpt = checkpoint.load(Path(path))
    if ckpt.get("format") != fmt:
        raise RunError(f"{path} is not a mauctl {what} checkpoint (format {ckpt.get('format')!r})")
    return Path(path), ckpt


class Interval:
    """Sums of named scalar tensors over the steps since the last log, kept on the device."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def read(self) -> dict[str, float]:
        names = list(self.sums)
        values = torch.stack([self.sums[n].float() for n in names]).tolist() if names else []  # one host sync
        return {n: v / self.count for n, v in zip(names, values)}

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def start_epoch(optimizer: Any, optim: Any, state: dict[str, Any], epoch: int) -> tuple[float, int]:
    """Set the epoch's LR; (lr, the step to start at): the saved step for the epoch resumed in, else 0.

    An epoch started from its first step starts its running sums afresh.
    """
    lr = lr_at(optim, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    first = state["step_in_epoch"] if epoch == state["epoch"] else 0
    if first == 0:
        state["sums"], state["count"] = {}, 0
    return lr, first


def accumulate(state: dict[str, Any], values: dict[str, float], count: int) -> None:
    """Add an interval's means (over ``count`` steps) to the epoch's running sums in ``state``."""
    for name, value in values.items():
        state["sums"][name] = state["sums"].get(name, 0.0) + value * count
    state["count"] += count


def epoch_means(state: dict[str, Any]) -> dict[str, float]:
    return {k: v / max(state["count"], 1) for k, v in state["sums"].items()}


def check_finite(values: dict[str, float], epoch: int, step: int, run: RunDir | None) -> None:
    """Stop with the step and the loss terms when any is NaN or infinite.

    The values are the same on every rank (global losses, gradients averaged over the ranks), so
    every rank stops here together. Every checkpoint is written after this check, so the last
    good one is never replaced by weights that a non-finite gradient has already spoilt.
    """
    if all(math.isfinite(v) for v in values.values()):
        return
    shown = ", ".join(f"{k} {v}" for k, v in values.items())
    what = "gradient" if all(math.isfinite(v) for k, v in values.items() if k != GRAD_NORM) else "loss"
    if run is not None:
        run.set_status("failed", epoch=epoch, step_in_epoch=step, reason=f"non-finite {what}")
    raise RunError(
        f"non-finite {what} at epoch {epoch + 1}, step {step} ({shown}); training stopped, "
        f"the last good checkpoint is kept",
        hint="Lower optim.lr or use run.precision = 'fp32'; resume with the same command.",
    )


GRAD_NORM = "grad_norm"


def grad_norm(parameters: Any) -> torch.Tensor:
    """The L2 norm of all gradients as a device tensor (no host sync): NaN or inf if any gradient is."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def save_on_main(runtime: Any, save: Any) -> None:
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


def announce_stop(reporter: Reporter, run: RunDir, is_main: bool, title: str, signum: int, epoch: int,
                  step: int) -> None:
    signame = signal.Signals(signum).name
    if is_main:
        run.set_status("stopped", epoch=epoch, step_in_epoch=step, signal=signame)
    reporter.line(f"{title} stopped by {signame} at epoch {epoch + 1}, step {step}: checkpoint saved to "
                  f"{run.last}; run the same command to resume")
