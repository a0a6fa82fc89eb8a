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
from mauctl.data.folder import data_root, scan_split
from mauctl.data.loader import BadImages, EpochSampler, SeededImages, make_loader
from mauctl.engine import checkpoint, faults
from mauctl.engine.loop import (
    GRAD_NORM,
    Interval,
    accumulate,
    announce_stop,
    check_finite,
    epoch_means,
    grad_norm,
    resume_checkpoint,
    save_on_main,
    start_run,
)
from mauctl.diagnostics import Monitor, held_out
from mauctl.engine.progress import Reporter, format_values
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import Runtime, derive_seed, rng_state, seed_everything
from mauctl.engine.schedule import lr_at
from mauctl.errors import RunError
from mauctl.launch import bn_splits
from mauctl.moco import MoCo, moco_losses, shuffled_keys

FORMAT = "mauctl.pretrain/1"
TERMS = ("loss", "contr", "align", "unif", "acc1", "acc5", GRAD_NORM)


def run(config: PretrainConfig, runtime: Runtime, meta: dict[str, Any]) -> str:
    """Train; return "finished", or "stopped" when a stop signal arrived (after saving)."""
    cfg, rt = config, runtime
    run_dir = RunDir(Path(cfg.run.out))
    index = scan_split(data_root(cfg.data), "train")
    per_rank = cfg.optim.batch_size // rt.world_size
    splits = bn_splits(cfg.model.bn_splits, per_rank)

    seed_everything(cfg.run.seed)  # identical initial weights and queue on every rank
    model = MoCo(cfg.model, splits).to(rt.device)
    encoder_q = model.encoder_q
    if rt.distributed:
        encoder_q = DistributedDataParallel(model.encoder_q, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "sums": {}, "count": 0}
    resumed_from = _resume(cfg, rt, run_dir, model, optimizer, scaler, state)

    log = start_run(run_dir, cfg, rt, meta, index, "pretrain", resumed_from, state, per_rank=per_rank,
                    bn_splits=splits)
    reporter = Reporter(rt.is_main, "pretrain", log)
    reporter.line(
        f"pretrain: {len(index.samples)} images, {len(index.classes)} classes, world size {rt.world_size} on "
        f"{rt.device.type}, batch {cfg.optim.batch_size} ({per_rank} per process, {splits} BN group(s)), "
        f"run directory {run_dir.path}"
        + (f", resuming from {resumed_from} at epoch {state['epoch'] + 1}" if resumed_from else "")
    )

    dataset = SeededImages(index.samples, TwoViews(pretrain_view(cfg.data.aug, cfg.data.image_size)),
                           report_skipped=True)
    sampler = EpochSampler(len(dataset), cfg.optim.batch_size, rt.rank, rt.world_size, cfg.run.seed)
    loader = make_loader(dataset, sampler, cfg.data.workers, pin_memory=rt.device.type == "cuda")
    bad = BadImages(index.root, len(index.samples), cfg.data.max_bad_fraction, rt)
    steps = sampler.steps
    monitor, every = _monitor(cfg, rt, index, reporter)

    def diagnose(epochs_done: int) -> dict[str, float]:
        """The representation diagnostics after ``epochs_done`` epochs: logged, and returned for the epoch line."""
        values = monitor.evaluate(model.encoder_q)
        reporter.record({"kind": "eval", "epochs_done": epochs_done, "step": state["global_step"], **values,
                         "eval_images": len(monitor.held.metric), "bank_images": len(monitor.held.bank),
                         "eval_source": monitor.held.source})
        return {k: v for k, v in values.items() if k != "eval_seconds"}

    def save(epoch: int, step_in_epoch: int) -> None:
        def write() -> None:
            _save(run_dir, cfg, rt, model, optimizer, scaler, state, epoch, step_in_epoch, splits)
            if step_in_epoch == 0 and cfg.run.save_every and epoch % cfg.run.save_every == 0:
                checkpoint.keep_copy(run_dir.last, run_dir.checkpoints / f"epoch_{epoch:04d}.pt")

        save_on_main(rt, write)  # a failed write stops every rank together, the previous checkpoint kept

    try:
        if monitor is not None and state["global_step"] == 0:
            before = diagnose(0)
            reporter.line(f"pretrain diagnostics before training: {format_values(before)}")
        for epoch in range(state["epoch"], cfg.optim.epochs):
            lr = lr_at(cfg.optim, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            first = state["step_in_epoch"] if epoch == state["epoch"] else 0
            if first == 0:
                state["sums"], state["count"] = {}, 0
            sampler.set_epoch(epoch, first)
            bad.reset()
            reporter.start_epoch(epoch, cfg.optim.epochs, steps, first)
            model.train()
            interval = Interval()
            epoch_clock = time.perf_counter()
            for i, ((x_q, x_k), _, skipped) in enumerate(loader, start=first):
                if skipped:
                    bad.add(skipped)  # undecodable images the loader replaced (host-side only)
                x_q = x_q.to(rt.device, non_blocking=True)
                x_k = x_k.to(rt.device, non_blocking=True)
                shuffle = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "shuffle", epoch, i))

                with rt.autocast():
                    q_local = F.normalize(encoder_q(x_q).float(), dim=1)
                q_local = faults.nan_at_step(q_local, state["global_step"] + 1, rt.rank, rt.world_size)  # test hook
                with torch.no_grad():
                    model.momentum_update(cfg.model.key_momentum)
                    k = shuffled_keys(model.encoder_k, x_k, rt, shuffle)
                q = rt.with_own_rows(q_local)
                terms = moco_losses(q, k, model.queue.keys, cfg.loss)

                optimizer.zero_grad(set_to_none=True)
                # Each rank holds the same global loss; DDP averages gradients over ranks: scale back up.
                scaler.scale(terms["loss"] * rt.world_size).backward()
                if not scaler.is_enabled():  # (fp16 overflows are the scaler's: it skips that step)
                    terms[GRAD_NORM] = grad_norm(model.encoder_q.parameters())  # checked before any save
                scaler.step(optimizer)
                scaler.update()
                model.queue.push(k)

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


def _monitor(cfg: PretrainConfig, rt: Runtime, train, reporter: Reporter) -> tuple[Monitor | None, int]:
    """The diagnostics monitor and how often it runs (None, 0 when eval.every = 0)."""
    every = cfg.eval.every_for(len(train.samples))
    if every == 0:
        return None, 0
    root = data_root(cfg.data)
    val = scan_split(root, "val") if (root / "val").is_dir() else None
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
