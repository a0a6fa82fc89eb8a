"""What every training loop (pretrain, lincls) shares: the run files at the start, each epoch's LR,
the logged terms summed without per-step host syncs, the non-finite check, and stopping on a signal."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Mapping
from typing import Any

import torch

from mauctl import files
from mauctl.config import to_toml
from mauctl.engine.checkpoint import TrainState
from mauctl.engine.manifest import write_manifest
from mauctl.engine.progress import MetricsLog, Reporter
from mauctl.engine.rundir import RunDir
from mauctl.engine.schedule import lr_at
from mauctl.errors import RunError

GRAD_NORM = "grad_norm"


def start_run(run: RunDir, config: Any, runtime: Any, meta: dict[str, Any], dataset: dict[str, Any], title: str,
              resumed_from: Any, state: TrainState, **effective: Any) -> MetricsLog | None:
    """Rank 0: create the run directory, write config.toml, manifest.json (``dataset``: FolderIndex.summary()),
    status, open metrics.jsonl."""
    if not runtime.is_main:
        return None
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        files.write_text_atomically(run.config, to_toml(config, f"Resolved by mauctl {title}; repeat the run "
                                                                 "with --config", preset=meta.get("preset")))
        write_manifest(run, config, runtime, {**meta, "command": title}, dataset, resumed_from=resumed_from,
                       **effective)
        log = MetricsLog(run.metrics, run.path / "tensorboard" if config.run.tensorboard else None)
        if resumed_from:
            log.write({"kind": "resume", "from": str(resumed_from), "epoch": state.epoch,
                       "step_in_epoch": state.step_in_epoch, "world_size": runtime.world_size})
        run.set_status("running", epoch=state.epoch, step_in_epoch=state.step_in_epoch)
    except OSError as exc:
        raise RunError(f"cannot write the run directory {run.path}: {exc.strerror or exc}",
                       hint="Check its permissions and free space, then run the same command again.") from None
    return log


def start_epoch(optimizer: Any, optim: Any, state: TrainState, epoch: int) -> tuple[float, int]:
    """Enter ``epoch`` with its LR; (lr, the step to start at: the saved one for the epoch resumed in, else 0)."""
    lr = lr_at(optim, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr, state.start_epoch(epoch)


class Interval:
    """Sums of named scalar tensors over the steps since the last log, kept on the device."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = time.perf_counter()

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
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


class StepLog:
    """One epoch's logging: the terms of each step summed on the device, and every ``print_freq`` steps
    (and at the epoch's last) read once, checked for NaN/inf, added to the epoch's sums, recorded
    in metrics.jsonl and shown. ``bad`` (BadImages) is agreed over the ranks at the same steps.
    """

    def __init__(self, reporter: Reporter, state: TrainState, runtime: Any, run: RunDir, print_freq: int,
                 images_per_step: int, bad: Any = None) -> None:
        self.reporter, self.state, self.print_freq = reporter, state, print_freq
        self.run = run if runtime.is_main else None  # whose status a failure sets
        self.images_per_step, self.bad = images_per_step, bad
        self.steps, self.lr = 0, 0.0
        self.interval = Interval()
        self.values: dict[str, float] = {}  # the last logging step's means, for the caller's checks

    def start_epoch(self, steps: int, first: int, lr: float) -> None:
        """The epoch ``state.epoch`` (entered by ``start_epoch`` above), ``steps`` long, from step ``first``."""
        self.steps, self.lr = steps, lr
        self.interval = Interval()
        if self.bad is not None:
            self.bad.reset()
        self.reporter.start_epoch(self.state.epoch, steps, first)

    def add(self, terms: Mapping[str, torch.Tensor], skipped: dict | None = None) -> bool:
        """Count one more step with its terms (and the bad images its batch skipped); log it when due.

        Whether it logged: the steps where checkpoints may be written, the same on every rank.
        """
        state = self.state
        state.step_in_epoch += 1
        state.global_step += 1
        self.interval.add(terms)
        if skipped and self.bad is not None:
            self.bad.add(skipped)  # undecodable images the loader replaced (host-side only)
        epoch, step = state.epoch, state.step_in_epoch
        if step % self.print_freq and step != self.steps:
            return False
        values = self.values = self.interval.read()
        check_finite(values, epoch, step, self.run)
        bad = {}
        if self.bad is not None:
            self.bad.agree(self.run, epoch, step)
            bad = self.bad.shown()
        state.accumulate(values, self.interval.count)
        ips = self.interval.count * self.images_per_step / max(self.interval.seconds(), 1e-9)
        self.reporter.step({"kind": "step", "epoch": epoch, "step": state.global_step, "step_in_epoch": step,
                            "lr": self.lr, **values, "images_per_s": ips, **bad},
                           {**values, "lr": self.lr, "img/s": round(ips), **bad})
        self.interval = Interval()
        return True

    def flush(self) -> None:
        """Before stopping within an interval: its steps go into the epoch's sums (checked, not shown)."""
        if self.interval.count:
            values = self.interval.read()
            check_finite(values, self.state.epoch, self.state.step_in_epoch, self.run)
            self.state.accumulate(values, self.interval.count)
            self.interval = Interval()


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


def grad_norm(parameters: Any) -> torch.Tensor:
    """The L2 norm of all gradients as a device tensor (no host sync): NaN or inf if any gradient is."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def stopped(reporter: Reporter, run: RunDir, runtime: Any, title: str, signum: int, state: TrainState) -> str:
    """Say that the run stopped on ``signum`` at ``state``'s position (checkpoint already written): "stopped"."""
    signame = signal.Signals(signum).name
    if runtime.is_main:
        run.set_status("stopped", epoch=state.epoch, step_in_epoch=state.step_in_epoch, signal=signame)
    reporter.finish(f"{title} stopped by {signame} at epoch {state.epoch + 1}, step {state.step_in_epoch}: "
                    f"checkpoint saved to {run.last}; run the same command to resume")
    return "stopped"
