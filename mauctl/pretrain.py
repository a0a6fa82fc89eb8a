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
from mauctl.data.augment import TwoViews, pretrain_view
from mauctl.data.folder import FolderIndex, data_root, scan_split, scan_split_if_present
from mauctl.data.loader import BadImages, EpochSampler, SeededImages, make_loader
from mauctl.diagnostics import Monitor, held_out
from mauctl.engine import checkpoint, faults
from mauctl.engine.loop import (
    GRAD_NORM,
    Interval,
    SaveClock,
    accumulate,
    announce_stop,
    check_finite,
    epoch_means,
    grad_norm,
    resume_checkpoint,
    save_on_main,
    start_epoch,
    start_run,
)
from mauctl.engine.progress import Reporter, format_values
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import Runtime, derive_seed, precision_name, resolve_auto, rng_state, seed_everything
from mauctl.errors import RunError
from mauctl.launch import bn_splits
from mauctl.moco import MoCo, moco_losses, shuffled_keys

FORMAT = "mauctl.pretrain/1"
TENSOR_ON_CPU_UP_TO = 64  # px: data.pipeline = "auto" picks the tensor pipeline on a CPU up to this size
TERMS = ("loss", "contr", "align", "unif", "acc1", "acc5", GRAD_NORM)


def run(config: PretrainConfig, runtime: Runtime, meta: dict[str, Any]) -> str:
    """Train; return "finished", or "stopped" when a stop signal arrived (after saving)."""
    cfg, rt = config, runtime
    run_dir = RunDir(Path(cfg.run.out))
    index = scan_split(data_root(cfg.data), "train")
    per_rank = cfg.optim.batch_size // rt.world_size
    training = Training(cfg, rt)
    model, optimizer, scaler, splits = training.model, training.optimizer, training.scaler, training.splits

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "sums": {}, "count": 0}
    resumed_from = _resume(cfg, rt, run_dir, model, optimizer, scaler, state)

    data = TrainData(cfg, rt, index)
    log = start_run(run_dir, cfg, rt, meta, index, "pretrain", resumed_from, state, per_rank=per_rank,
                    bn_splits=splits, pipeline=data.pipeline, compile=training.compiled,
                    channels_last=training.channels_last)
    reporter = Reporter(rt.is_main, "pretrain", log)
    reporter.line(
        f"pretrain: {len(index.samples)} images, {len(index.classes)} classes, world size {rt.world_size} on "
        f"{rt.device.type}, batch {cfg.optim.batch_size} ({per_rank} per process, {splits} BN group(s)), "
        f"{training.describe()}, {data.pipeline} data pipeline, run directory {run_dir.path}"
        + (f", resuming from {resumed_from} at epoch {state['epoch'] + 1}" if resumed_from else "")
    )

    bad = BadImages(index.root, len(index.samples), cfg.data.max_bad_fraction, rt)
    steps = data.steps
    monitor, every = _monitor(cfg, rt, index, reporter)

    def diagnose(epochs_done: int) -> dict[str, float]:
        """The representation diagnostics after ``epochs_done`` epochs: logged, and returned for the epoch line."""
        values = monitor.evaluate(model.encoder_q)
        reporter.record({"kind": "eval", "epochs_done": epochs_done, "step": state["global_step"], **values,
                         "eval_images": len(monitor.held.metric), "bank_images": len(monitor.held.bank),
                         "eval_source": monitor.held.source})
        return {k: v for k, v in values.items() if k != "eval_seconds"}

    save_clock = SaveClock(cfg.run.save_minutes, rt)

    def save(epoch: int, step_in_epoch: int) -> None:
        def write() -> None:
            _save(run_dir, cfg, rt, model, optimizer, scaler, state, epoch, step_in_epoch, splits)
            if step_in_epoch == 0 and cfg.run.save_every and epoch % cfg.run.save_every == 0:
                checkpoint.keep_copy(run_dir.last, run_dir.checkpoints / f"epoch_{epoch:04d}.pt")

        save_on_main(rt, write)  # a failed write stops every rank together, the previous checkpoint kept
        save_clock.reset()

    try:
        if monitor is not None and state["global_step"] == 0:
            before = diagnose(0)
            reporter.line(f"pretrain diagnostics before training: {format_values(before)}")
        for epoch in range(state["epoch"], cfg.optim.epochs):
            lr, first = start_epoch(optimizer, cfg.optim, state, epoch)
            bad.reset()
            reporter.start_epoch(epoch, cfg.optim.epochs, steps, first)
            model.train()
            interval = Interval()
            epoch_clock = time.perf_counter()
            for i, (x_q, x_k, skipped) in enumerate(data.batches(epoch, first), start=first):
                if skipped:
                    bad.add(skipped)  # undecodable images the loader replaced (host-side only)
                shuffle = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "shuffle", epoch, i))
                terms = training.step(x_q, x_k, shuffle, state["global_step"] + 1)
                state["global_step"] += 1
                interval.add({name: terms[name] for name in TERMS if name in terms})
                done = i + 1
                if done % cfg.run.print_freq == 0 or done == steps:
                    values = interval.read()
                    check_finite(values, epoch, done, run_dir if rt.is_main else None)
                    bad.agree(run_dir if rt.is_main else None, epoch, done)
                    accumulate(state, values, interval.count)
                    ips = interval.count * cfg.optim.batch_size / max(interval.seconds(), 1e-9)
                    record = {"kind": "step", "epoch": epoch, "step": state["global_step"], "step_in_epoch": done,
                              "lr": lr, **values, "images_per_s": ips, **bad.shown()}
                    reporter.step(record, {**values, "lr": lr, "img/s": round(ips), **bad.shown()}, steps)
                    interval = Interval()
                    if done < steps and save_clock.due():
                        save(epoch, done)  # the sums so far are in state: a resume goes on from here
                signum = rt.agreed_stop()
                if signum and done < steps:
                    values = interval.read() if interval.count else {}
                    check_finite(values, epoch, done, run_dir if rt.is_main else None)
                    accumulate(state, values, interval.count)
                    save(epoch, done)
                    announce_stop(reporter, run_dir, rt.is_main, "pretrain", signum, epoch, done)
                    return "stopped"

            means = epoch_means(state)
            seconds = time.perf_counter() - epoch_clock
            record = {"kind": "epoch", "epoch": epoch, "step": state["global_step"], "lr": lr, **means,
                      "images_per_s": (steps - first) * cfg.optim.batch_size / max(seconds, 1e-9), "seconds": seconds,
                      "bad_images": bad.count}
            save(epoch + 1, 0)
            last = epoch + 1 == cfg.optim.epochs
            diagnostics = diagnose(epoch + 1) if monitor is not None and ((epoch + 1) % every == 0 or last) else {}
            reporter.end_epoch(record, {**means, **diagnostics, "lr": lr, **bad.shown()})
            signum = rt.agreed_stop()
            if signum and epoch + 1 < cfg.optim.epochs:
                announce_stop(reporter, run_dir, rt.is_main, "pretrain", signum, epoch + 1, 0)
                return "stopped"
        if rt.is_main:
            run_dir.set_status("finished", epoch=cfg.optim.epochs, step_in_epoch=0, global_step=state["global_step"])
        reporter.line(f"pretrain finished: {cfg.optim.epochs} epochs; checkpoint {run_dir.last}")
        return "finished"
    finally:
        reporter.close()


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

    def describe(self) -> str:
        return ", ".join([precision_name(self.rt.dtype)] + ["channels_last"] * self.channels_last + ["compiled"] * self.compiled)

    def step(self, x_q: torch.Tensor, x_k: torch.Tensor, shuffle: torch.Generator,
             global_step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's views; the loss terms as device tensors."""
        cfg, rt, model = self.cfg, self.rt, self.model
        if self.channels_last:
            x_q, x_k = x_q.contiguous(memory_format=torch.channels_last), x_k.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            q_local = F.normalize(self.encoder_q(x_q).float(), dim=1)
        q_local = faults.nan_at_step(q_local, global_step, rt.rank, rt.world_size)  # a test hook
        with torch.no_grad():
            model.momentum_update(cfg.model.key_momentum)
            k = shuffled_keys(self.encoder_k, x_k, rt, shuffle)
        q = rt.with_own_rows(q_local)
        terms = moco_losses(q, k, model.queue.keys, cfg.loss)

        self.optimizer.zero_grad(set_to_none=True)
        # Each rank holds the same global loss; DDP averages gradients over ranks: scale back up.
        self.scaler.scale(terms["loss"] * rt.world_size).backward()
        if not self.scaler.is_enabled():  # (fp16 overflows are the scaler's: it skips that step)
            terms[GRAD_NORM] = grad_norm(model.encoder_q.parameters())  # checked before any save
        self.scaler.step(self.optimizer)
        self.scaler.update()
        model.queue.push(k)
        return terms


class TrainData:
    """One rank's training batches on its device: (query views, key views, skipped bad images).

    data.pipeline "pil": augment.py's PIL recipe in the loader workers (the reference). "tensor":
    the workers decode and crop, the colour / blur / flip ops run on whole batches on the device
    (data.batch_augment; the same random choices as the PIL recipe). "auto": tensor on CUDA, and on a CPU
    for images up to 64 px; PIL otherwise.
    """

    def __init__(self, cfg: PretrainConfig, rt: Runtime, index: FolderIndex, pipeline: str | None = None) -> None:
        self.rt = rt
        self.pipeline = pipeline or pipeline_for(cfg, rt.device.type)
        self.sampler = EpochSampler(len(index.samples), cfg.optim.batch_size, rt.rank, rt.world_size, cfg.run.seed)
        pin = rt.device.type == "cuda"
        if self.pipeline == "pil":
            views = TwoViews(pretrain_view(cfg.data.aug, cfg.data.image_size))
            self.loader = make_loader(SeededImages(index.samples, views, report_skipped=True), self.sampler,
                                      cfg.data.workers, pin_memory=pin)
        else:
            from mauctl.data.batch_augment import BatchAugment, make_tensor_loader

            self.gpu_decode = cfg.data.gpu_decode and rt.device.type == "cuda"
            self.loader = make_tensor_loader(index.samples, cfg.data.aug, cfg.data.image_size, self.sampler,
                                             cfg.data.workers, pin, decode_on="cuda" if self.gpu_decode else "cpu")
            self.augment = BatchAugment(cfg.data.aug, cfg.data.image_size)

    @property
    def steps(self) -> int:
        return self.sampler.steps

    def batches(self, epoch: int, first: int = 0):
        """The batches of ``epoch`` from step ``first`` on."""
        self.sampler.set_epoch(epoch, first)
        device = self.rt.device
        for batch in self.loader:
            if self.pipeline == "pil":
                (x_q, x_k), _, skipped = batch
                yield x_q.to(device, non_blocking=True), x_k.to(device, non_blocking=True), skipped
            else:
                views, params, _, skipped = batch
                x_q, x_k = self.augment.two_views(views.to(device, non_blocking=True),
                                                  params.to(device, non_blocking=True))
                yield x_q, x_k, skipped

    def close(self) -> None:
        """Stop the loader's worker processes now (they are kept between epochs)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()


def pipeline_for(cfg: PretrainConfig, device_type: str) -> str:
    """data.pipeline, with "auto" resolved to the faster one (`mauctl bench --compare-pil` measures both)."""
    if cfg.data.pipeline != "auto":
        return cfg.data.pipeline
    # On a CPU the batched ops share the cores with the model: measured 3x faster per worker than
    # PIL at 16-32 px, about as fast at 224 px (README, Speed).
    small = cfg.data.image_size <= TENSOR_ON_CPU_UP_TO
    return "tensor" if device_type == "cuda" or small else "pil"


def _monitor(cfg: PretrainConfig, rt: Runtime, train, reporter: Reporter) -> tuple[Monitor | None, int]:
    """The diagnostics monitor and how often it runs (None, 0 when eval.every = 0)."""
    every = cfg.eval.every_for(len(train.samples))
    if every == 0:
        return None, 0
    val = scan_split_if_present(data_root(cfg.data), "val")
    held = held_out(train, val, cfg.eval.images, cfg.eval.bank_images, cfg.run.seed)
    if len(held.metric) < 2:
        reporter.line(f"pretrain: no representation diagnostics: {len(held.metric)} held-out image(s) from "
                      f"{held.source}/, at least 2 are needed (add a val/ folder, or set eval.every = 0)")
        return None, 0
    monitor = Monitor(held, cfg.data.aug, cfg.data.image_size, cfg.run.seed, cfg.data.workers,
                      cfg.optim.batch_size // rt.world_size, rt, cfg.model.dim, knn=cfg.eval.bank_images > 0,
                      k=cfg.eval.knn_k, tau=cfg.eval.knn_t)
    return monitor, every


def _save(run_dir: RunDir, cfg: PretrainConfig, rt: Runtime, model: MoCo, optimizer, scaler,
          state: dict[str, Any], epoch: int, step_in_epoch: int, splits: int) -> None:
    checkpoint.save_atomic(
        {
            "format": FORMAT,
            "arch": cfg.model.arch,
            "epoch": epoch,  # epochs completed; training continues with this (0-based) epoch
            "step_in_epoch": step_in_epoch,
            "global_step": state["global_step"],
            "epoch_sums": dict(state["sums"]),
            "epoch_count": state["count"],
            "encoder_q": model.encoder_q.state_dict(),
            "encoder_k": model.encoder_k.state_dict(),
            "queue": model.queue.keys.detach().cpu(),
            "queue_ptr": model.queue.ptr,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "config": cfg.model_dump(),
            "world_size": rt.world_size,
            "bn_splits": splits,
        },
        run_dir.last,
    )


def _resume(cfg: PretrainConfig, rt: Runtime, run_dir: RunDir, model: MoCo, optimizer, scaler,
            state: dict[str, Any]) -> Path | None:
    """Load the checkpoint rank 0 picks (every rank reads the same file: a shared run directory)."""
    path, ckpt = resume_checkpoint(run_dir, cfg.run.resume, rt, FORMAT, "pretraining")
    if path is None:
        return None
    try:
        model.encoder_q.load_state_dict(ckpt["encoder_q"])
        model.encoder_k.load_state_dict(ckpt["encoder_k"])
        model.queue.keys.copy_(ckpt["queue"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"{path} does not fit this model (model.* settings differ?): {exc}") from None
    model.queue.ptr = int(ckpt["queue_ptr"])
    scaler.load_state_dict(ckpt["scaler"])
    state.update(epoch=int(ckpt["epoch"]), step_in_epoch=int(ckpt["step_in_epoch"]),
                 global_step=int(ckpt["global_step"]), sums=dict(ckpt.get("epoch_sums", {})),
                 count=int(ckpt.get("epoch_count", 0)))
    return path
