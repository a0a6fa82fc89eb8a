"""The pretraining job, top to bottom: build, resume, train epoch by epoch, checkpoint, stop.

Runs inside one worker process (rank ``runtime.rank`` of ``runtime.world_size``); rank 0 also
writes the run directory. See ``mauctl.moco`` for the model and the shuffled keys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mauctl.config import PretrainConfig
from mauctl.data.folder import FolderIndex, data_root, scan_split, scan_split_if_present
from mauctl.data.loader import BadImages
from mauctl.data.pipeline import TrainData
from mauctl.diagnostics import Monitor, held_out
from mauctl.engine import faults
from mauctl.engine.checkpoint import PRETRAIN_FORMAT, Checkpointer, TrainState
from mauctl.collapse import Q_STD, CollapseGuard, embedding_std
from mauctl.engine.loop import GRAD_NORM, StepLog, grad_norm, start_epoch, start_run, stopped
from mauctl.engine.progress import Reporter, format_values
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import Runtime, derive_seed, precision_name, resolve_auto, seed_everything
from mauctl.moco import MoCo, bn_splits, moco_losses, shuffled_keys
from mauctl.text import plural


def run(config: PretrainConfig, runtime: Runtime, meta: dict[str, Any]) -> str:
    """Train; return "finished", or "stopped" when a stop signal arrived (after saving)."""
    cfg, rt = config, runtime
    run_dir, state = RunDir(Path(cfg.run.out)), TrainState()
    index = scan_split(data_root(cfg.data), "train")
    training = Training(cfg, rt)
    checkpoints = Checkpointer(run_dir, rt, PRETRAIN_FORMAT, cfg, training.parts(), training.facts(),
                               save_every=cfg.run.save_every, save_minutes=cfg.run.save_minutes)
    resumed_from = checkpoints.resume(state, cfg.run.resume)
    data = TrainData(cfg, rt, index)
    log = start_run(run_dir, cfg, rt, meta, index.summary(), "pretrain", resumed_from, state, pipeline=data.pipeline,
                    **training.effective())
    reporter = Reporter(rt.is_main, "pretrain", log, cfg.optim.epochs)
    steps = StepLog(reporter, state, rt, run_dir, cfg.run.print_freq, cfg.optim.batch_size,
                    BadImages(index.root, len(index.samples), cfg.data.max_bad_fraction, rt))
    diagnostics = Diagnostics(cfg, rt, index, reporter)
    collapse = CollapseGuard(cfg, reporter, run_dir if rt.is_main else None, len(index.samples), meta.get("preset"))
    try:
        reporter.line(_first_line(cfg, rt, index, training, data, run_dir, resumed_from, state))
        if state.global_step == 0:
            diagnostics.before_training(training.model.encoder_q)
        for epoch in range(state.epoch, cfg.optim.epochs):
            lr, first = start_epoch(training.optimizer, cfg.optim, state, epoch)
            steps.start_epoch(data.steps, first, lr)
            training.model.train()
            clock = time.perf_counter()
            for x_q, x_k, skipped in data.batches(epoch, first):
                shuffle = torch.Generator(rt.device).manual_seed(derive_seed(cfg.run.seed, "shuffle", epoch,
                                                                             state.step_in_epoch))
                terms = training.step(x_q, x_k, shuffle, state.global_step + 1)
                # log if due; at a logging step, watch for collapse, then save if due (the epoch's sums so far
                # go into the checkpoint)
                if steps.add(terms, skipped):
                    collapse.check(steps.values, state)
                    if state.step_in_epoch < data.steps:
                        checkpoints.save_if_due(state)
                # stop if asked (the same answer on every rank); at the epoch's last step, after its end
                signum = rt.agreed_stop()
                if signum and state.step_in_epoch < data.steps:
                    steps.flush()
                    checkpoints.stopping(state)
                    return stopped(reporter, run_dir, rt, "pretrain", signum, state)
            # the epoch's end: checkpoint, diagnostics when due, its line
            state.finish_epoch()
            seconds = time.perf_counter() - clock
            checkpoints.end_epoch(state)
            shown = diagnostics.after_epoch(training.model.encoder_q, state, cfg.optim.epochs)
            reporter.end_epoch(*_epoch_record(cfg, state, lr, data.steps - first, seconds, steps.bad, shown))
            signum = rt.agreed_stop()
            if signum and state.epoch < cfg.optim.epochs:
                return stopped(reporter, run_dir, rt, "pretrain", signum, state)
        if rt.is_main:
            run_dir.set_status("finished", epoch=cfg.optim.epochs, step_in_epoch=0, global_step=state.global_step)
        reporter.line(f"pretrain finished: {plural(cfg.optim.epochs, 'epoch')}; checkpoint {run_dir.last}")
        return "finished"
    finally:
        reporter.close()


def _first_line(cfg: PretrainConfig, rt: Runtime, index: FolderIndex, training: Training, data: TrainData,
                run_dir: RunDir, resumed_from: Path | None, state: TrainState) -> str:
    per_rank = cfg.optim.batch_size // rt.world_size
    return (f"pretrain: {plural(len(index.samples), 'image')}, {plural(len(index.classes), 'class', 'classes')}, "
            f"world size {rt.world_size} on {rt.device.type}, batch {cfg.optim.batch_size} ({per_rank} per process, "
            f"{plural(training.splits, 'BN group')}), {training.describe()}, {data.pipeline} data pipeline, "
            f"run directory {run_dir.path}"
            + (f", resuming from {resumed_from} at epoch {state.epoch + 1}" if resumed_from else ""))


def _epoch_record(cfg: PretrainConfig, state: TrainState, lr: float, steps_run: int, seconds: float,
                  bad: BadImages, diagnostics: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The epoch's record for metrics.jsonl and what its line shows."""
    means = state.means()
    record = {"kind": "epoch", "epoch": state.epoch - 1, "step": state.global_step, "lr": lr, **means,
              "images_per_s": steps_run * cfg.optim.batch_size / max(seconds, 1e-9), "seconds": seconds,
              "bad_images": bad.count}
    return record, {**means, **diagnostics, "lr": lr, **bad.shown()}


class Training:
    """The model, its optimizer and one MoCo step: what ``run`` loops over and ``mauctl bench`` times.

    Precision (autocast; the losses stay float32), channels_last and torch.compile follow
    run.precision / run.channels_last / run.compile ("auto": on for CUDA, off on CPU). The step
    never waits for the device: its values stay tensors until a logging step reads them.
    """

    def __init__(self, cfg: PretrainConfig, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.splits = bn_splits(cfg.model.bn_splits, cfg.optim.batch_size // rt.world_size)
        seed_everything(cfg.run.seed)  # identical initial weights and queue on every rank
        self.model = model = MoCo(cfg.model, self.splits).to(rt.device)
        self.channels_last = resolve_auto(cfg.run.channels_last, rt.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        encoder_q: torch.nn.Module = model.encoder_q
        if rt.distributed:
            encoder_q = DistributedDataParallel(encoder_q, device_ids=[rt.device] if rt.device.type == "cuda" else None)
        self.compiled = resolve_auto(cfg.run.compile, rt.device)
        self.encoder_q = torch.compile(encoder_q) if self.compiled else encoder_q
        self.encoder_k = torch.compile(model.encoder_k) if self.compiled else model.encoder_k
        # one fused kernel (CUDA) or one multi-tensor launch per op (CPU) instead of a loop over parameters
        fast = {"fused": True} if rt.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay, **fast)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    def parts(self) -> dict[str, Any]:
        """What a checkpoint saves and a resume restores (engine/checkpoint.py lists the layout)."""
        return {"encoder_q": self.model.encoder_q, "encoder_k": self.model.encoder_k, "queue": self.model.queue,
                "optimizer": self.optimizer, "scaler": self.scaler}

    def facts(self) -> dict[str, Any]:
        """What a checkpoint records for its readers: the architecture and how the batch was split."""
        return {"arch": self.cfg.model.arch, "world_size": self.rt.world_size, "bn_splits": self.splits}

    def effective(self) -> dict[str, Any]:
        """The settings this run resolved ("auto" and batch splits), for the manifest."""
        return {"per_rank": self.cfg.optim.batch_size // self.rt.world_size, "bn_splits": self.splits,
                "compile": self.compiled, "channels_last": self.channels_last}

    def describe(self) -> str:
        return ", ".join([precision_name(self.rt.dtype)] + ["channels_last"] * self.channels_last
                         + ["compiled"] * self.compiled)

    def step(self, x_q: torch.Tensor, x_k: torch.Tensor, shuffle: torch.Generator,
             global_step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's views; the loss terms as device tensors.

        ``shuffle``: a generator on ``rt.device``, seeded alike on every rank (the shuffle BN permutation).
        """
        cfg, rt, model = self.cfg, self.rt, self.model
        if self.channels_last:
            x_q, x_k = x_q.contiguous(memory_format=torch.channels_last), x_k.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            q_local = F.normalize(self.encoder_q(x_q).float(), dim=1)
        q_local = faults.nan_at_step(q_local, global_step, rt.rank, rt.world_size)  # a test hook
        with torch.no_grad():
            model.momentum_update(cfg.model.key_momentum)
            k = shuffled_keys(self.encoder_k, x_k, rt, shuffle)
        q = rt.with_own_rows(q_local)  # rows in rank order, each rank's in its BN groups' order
        terms = moco_losses(q, k, model.queue.keys, cfg.loss, bn_groups=self.splits * rt.world_size)
        terms[Q_STD] = embedding_std(q)  # the collapse guard's statistic (collapse.py)

        self.optimizer.zero_grad(set_to_none=True)
        # Each rank holds the same global loss; DDP averages gradients over ranks: scale back up. (L_uniform,
        # a mean over all ranks' groups, then reaches each rank's rows as the mean over its own groups,
        # and DDP's average is the mean over all groups: the original's average over GPUs.)
        self.scaler.scale(terms["loss"] * rt.world_size).backward()
        if not self.scaler.is_enabled():  # (fp16 overflows are the scaler's: it skips that step)
            terms[GRAD_NORM] = grad_norm(model.encoder_q.parameters())  # checked before any save
        self.scaler.step(self.optimizer)
        self.scaler.update()
        model.queue.push(k)
        return terms


class Diagnostics:
    """The representation diagnostics (diagnostics.py) of a run: before training, every eval.every
    epochs and after the last one; recorded in metrics.jsonl and returned for the epoch's line."""

    def __init__(self, cfg: PretrainConfig, rt: Runtime, train: FolderIndex, reporter: Reporter) -> None:
        self.reporter, self.every, self.monitor = reporter, cfg.eval.every_for(len(train.samples)), None
        if self.every == 0:
            return
        val = scan_split_if_present(data_root(cfg.data), "val")
        held = held_out(train, val, cfg.eval.images, cfg.eval.bank_images, cfg.run.seed)
        if len(held.metric) < 2:
            reporter.line(f"pretrain: no representation diagnostics: {plural(len(held.metric), 'held-out image')} "
                          f"from {held.source}/, at least 2 are needed (add a val/ folder, or set eval.every = 0)")
            return
        self.monitor = Monitor(held, cfg.data.aug, cfg.data.image_size, cfg.run.seed, cfg.data.workers,
                               cfg.optim.batch_size // rt.world_size, rt, cfg.model.dim,
                               knn=cfg.eval.bank_images > 0, k=cfg.eval.knn_k, tau=cfg.eval.knn_t)

    def before_training(self, encoder: torch.nn.Module) -> None:
        if self.monitor is not None:
            values = self._measure(encoder, 0, 0)
            self.reporter.line(f"pretrain diagnostics before training: {format_values(values)}")

    def after_epoch(self, encoder: torch.nn.Module, state: TrainState, epochs: int) -> dict[str, float]:
        due = self.monitor is not None and (state.epoch % self.every == 0 or state.epoch == epochs)
        return self._measure(encoder, state.epoch, state.global_step) if due else {}

    def _measure(self, encoder: torch.nn.Module, epochs_done: int, step: int) -> dict[str, float]:
        values = self.monitor.evaluate(encoder)
        held = self.monitor.held
        self.reporter.record({"kind": "eval", "epochs_done": epochs_done, "step": step, **values,
                              "eval_images": len(held.metric), "bank_images": len(held.bank),
                              "eval_source": held.source})
        return {k: v for k, v in values.items() if k != "eval_seconds"}
