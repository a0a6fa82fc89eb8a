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
from mauctl.data.loader import EpochSampler, SeededImages, make_loader
from mauctl.engine import checkpoint
from mauctl.engine.loop import (
    Interval,
    accumulate,
    announce_stop,
    check_finite,
    epoch_means,
    resume_checkpoint,
    start_run,
)
from mauctl.engine.progress import Reporter
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import Runtime, derive_seed, rng_state, seed_everything
from mauctl.engine.schedule import lr_at
from mauctl.errors import RunError
from mauctl.launch import bn_splits
from mauctl.moco import MoCo, moco_losses, shuffled_keys

FORMAT = "mauctl.pretrain/1"
TERMS = ("loss", "contr", "align", "unif", "acc1", "acc5")


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

    dataset = SeededImages(index.samples, TwoViews(pretrain_view(cfg.data.aug, cfg.data.image_size)))
    sampler = EpochSampler(len(dataset), cfg.optim.batch_size, rt.rank, rt.world_size, cfg.run.seed)
    loader = make_loader(dataset, sampler, cfg.data.workers, pin_memory=rt.device.type == "cuda")
    steps = sampler.steps

    def save(epoch: int, step_in_epoch: int) -> None:
        if rt.is_main:
            _save(run_dir, cfg, rt, model, optimizer, scaler, state, epoch, step_in_epoch, splits)
        rt.barrier()

    try:
        for epoch in range(state["epoch"], cfg.optim.epochs):
            lr = lr_at(cfg.optim, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            first = state["step_in_epoch"] if epoch == state["epoch"] else 0
            if first == 0:
                state["sums"], state["count"] = {}, 0
            sampler.set_epoch(epoch, first)
            reporter.start_epoch(epoch, cfg.optim.epochs, steps, first)
            model.train()
            interval = Interval()
            epoch_clock = time.perf_counter()
            for i, ((x_q, x_k), _) in enumerate(loader, start=first):
                x_q = x_q.to(rt.device, non_blocking=True)
                x_k = x_k.to(rt.device, non_blocking=True)
                shuffle = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "shuffle", epoch, i))

                with rt.autocast():
                    q_local = F.normalize(encoder_q(x_q).float(), dim=1)
                with torch.no_grad():
                    model.momentum_update(cfg.model.key_momentum)
                    k = shuffled_keys(model.encoder_k, x_k, rt, shuffle)
                q = rt.with_own_rows(q_local)
                terms = moco_losses(q, k, model.queue.keys, cfg.loss)

                optimizer.zero_grad(set_to_none=True)
                # Each rank holds the same global loss; DDP averages gradients over ranks: scale back up.
                scaler.scale(terms["loss"] * rt.world_size).backward()
                scaler.step(optimizer)
                scaler.update()
                model.queue.push(k)

                state["global_step"] += 1
                interval.add({name: terms[name] for name in TERMS if name in terms})
                done = i + 1
                if done % cfg.run.print_freq == 0 or done == steps:
                    values = interval.read()
                    check_finite(values, epoch, done, run_dir if rt.is_main else None)
                    accumulate(state, values, interval.count)
                    ips = interval.count * cfg.optim.batch_size / max(interval.seconds(), 1e-9)
                    record = {"kind": "step", "epoch": epoch, "step": state["global_step"], "step_in_epoch": done,
                              "lr": lr, **values, "images_per_s": ips}
                    reporter.step(record, {**values, "lr": lr, "img/s": round(ips)}, steps)
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
                      "images_per_s": (steps - first) * cfg.optim.batch_size / max(seconds, 1e-9), "seconds": seconds}
            save(epoch + 1, 0)
            if rt.is_main and cfg.run.save_every and (epoch + 1) % cfg.run.save_every == 0:
                checkpoint.keep_copy(run_dir.last, run_dir.checkpoints / f"epoch_{epoch + 1:04d}.pt")
            reporter.end_epoch(record, {**means, "lr": lr})
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
