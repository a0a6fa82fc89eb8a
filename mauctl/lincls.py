"""The linear probe, top to bottom: the original main_lincls.py protocol on the shared engine.

The pretrained backbone is frozen and kept in eval mode (its BatchNorm statistics stay the
pretrained ones); only a new final linear layer (weights N(0, 0.01), bias 0) is trained, with
SGD. Top-1 / top-5 on ``val/`` after every epoch; the best epoch is kept in ``best.pt``.
After the first epoch every backbone weight is compared with the checkpoint's (it must not move).

``<out>/results.json`` (what ``mauctl report`` reads)::

    {"format": "mauctl.lincls-results/1", "name", "finished", "top1", "top5", "best_top1", "best_epoch",
     "epochs_done", "wall_time_s",
     "protocol": {"kind": "per-epoch", "epochs", "lr", "batch_size", "schedule", "cos", "momentum",
                  "weight_decay", "image_size", "crop_scale", "flip",
                  "dataset": {"root", "classes", "train_images", "val_images", "class_list_sha256"}},
     "pretrain": {"source", "path", "run_dir", "arch", "epoch", "config_digest", "config"},
     "history": [{"epoch", "top1", "top5", "train_loss", "train_acc1", "lr"}, ...]}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mauctl.backbone import last_linear
from mauctl.config import LinclsConfig
from mauctl.data.augment import eval_transform, lincls_train_transform
from mauctl.data.folder import FolderIndex, class_list_digest, scan_split
from mauctl.data.loader import BadImages, EpochSampler, SeededImages, ShardSampler, make_loader
from mauctl.engine import checkpoint
from mauctl.engine.loop import (
    Interval,
    SaveClock,
    accumulate,
    announce_stop,
    check_finite,
    epoch_means,
    resume_checkpoint,
    save_on_main,
    start_epoch,
    start_run,
)
from mauctl.engine.progress import Reporter
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import Runtime, derive_seed, rng_state, seed_everything
from mauctl.errors import RunError
from mauctl.losses import topk_accuracy
from mauctl.weights import Encoder, read_encoder

FORMAT = "mauctl.lincls/1"
RESULTS_FORMAT = "mauctl.lincls-results/1"


def run(config: LinclsConfig, runtime: Runtime, meta: dict[str, Any]) -> str:
    """Train the probe; return "finished", or "stopped" when a stop signal arrived (after saving)."""
    cfg, rt = config, runtime
    run_dir = RunDir(Path(cfg.run.out))
    enc = read_encoder(meta["source"])
    root = Path(meta["data_root"])
    train, val = scan_split(root, "train"), scan_split(root, "val")
    if meta.get("evaluate"):
        return _evaluate_only(cfg, rt, enc, val, run_dir)

    seed_everything(cfg.run.seed)
    model = frozen_with_new_classifier(enc, len(train.classes)).to(rt.device)
    fc = last_linear(model)[2]
    optimizer = torch.optim.SGD(fc.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "sums": {}, "count": 0,
                             "best_top1": -1.0, "best_epoch": 0, "history": [], "wall_time_s": 0.0}
    resumed_from = _resume(cfg, rt, run_dir, model, optimizer, scaler, state)
    log = start_run(run_dir, cfg, rt, meta, train, "lincls", resumed_from, state, source=str(enc.path))
    reporter = Reporter(rt.is_main, "lincls", log)
    kind = "cached features" if cfg.lincls.cached_features else "per-epoch"
    reporter.line(
        f"lincls ({kind}): {enc.arch} from {enc.path} ({enc.source}), {len(train.classes)} classes, "
        f"{len(train.samples)} train / {len(val.samples)} val images, world size {rt.world_size} on {rt.device.type}"
        + (f", resuming at epoch {state['epoch'] + 1}" if resumed_from else "")
    )
    built = time.perf_counter()
    trainer = (CachedTrainer if cfg.lincls.cached_features else ImageTrainer)(cfg, rt, model, optimizer, scaler,
                                                                               train, val, reporter)
    state["wall_time_s"] += time.perf_counter() - built  # the cached features' extraction is part of the probe
    source = _source_info(enc)
    data_info = _dataset_info(root, train, val)
    last_save = time.perf_counter()

    save_clock = SaveClock(cfg.run.save_minutes, rt)

    def save(epoch: int, step_in_epoch: int, best: bool = False) -> None:
        def write() -> None:
            checkpoint.save_atomic(_checkpoint(cfg, model, optimizer, scaler, state, epoch, step_in_epoch, source),
                                   run_dir.last)
            if best:
                checkpoint.keep_copy(run_dir.last, run_dir.path / "best.pt", replace=True)

        save_on_main(rt, write)  # a failed write stops every rank together, the previous checkpoint kept
        save_clock.reset()

    def save_if_due(epoch: int, done: int) -> None:
        """At a logging step within an epoch: write last.pt when run.save_minutes have passed."""
        if save_clock.due():
            save(epoch, done)

    try:
        for epoch in range(state["epoch"], cfg.optim.epochs):
            clock = time.perf_counter()
            lr, first = start_epoch(optimizer, cfg.optim, state, epoch)
            model.eval()  # the backbone's BatchNorm keeps its pretrained statistics, as in main_lincls.py
            stopped_at = trainer.train_epoch(epoch, first, lr, state, run_dir, save_if_due)
            if stopped_at is not None:
                state["wall_time_s"] += time.perf_counter() - clock
                save(epoch, stopped_at)
                announce_stop(reporter, run_dir, rt.is_main, "lincls", rt.agreed_stop(), epoch, stopped_at)
                return "stopped"
            if epoch == 0 and first == 0:
                check_frozen(model, enc)
            top1, top5 = trainer.evaluate()
            means = epoch_means(state)
            state["history"].append({"epoch": epoch + 1, "top1": top1, "top5": top5,
                                     "train_loss": means.get("loss"), "train_acc1": means.get("acc1"), "lr": lr})
            best = top1 > state["best_top1"]
            if best:
                state["best_top1"], state["best_epoch"] = top1, epoch + 1
            state["wall_time_s"] += time.perf_counter() - clock
            final = epoch + 1 == cfg.optim.epochs
            # cached epochs take milliseconds: a full checkpoint every epoch would cost more than training
            if trainer.save_every_epoch or final or best or time.perf_counter() - last_save > 60:
                save(epoch + 1, 0, best=best)
                last_save = time.perf_counter()
            if rt.is_main:
                _write_results(run_dir, cfg, meta, state, source, data_info, finished=final)
            bad = trainer.bad_images()
            reporter.end_epoch({"kind": "epoch", "epoch": epoch, "step": state["global_step"], "lr": lr,
                                "train_loss": means.get("loss"), "train_acc1": means.get("acc1"),
                                "top1": top1, "top5": top5, **bad},
                               {"loss": means.get("loss", 0.0), "top1": top1, "top5": top5,
                                "best": state["best_top1"], **{k: v for k, v in bad.items() if v}})
            signum = rt.agreed_stop()
            if signum and not final:
                save(epoch + 1, 0)
                announce_stop(reporter, run_dir, rt.is_main, "lincls", signum, epoch + 1, 0)
                return "stopped"
        if rt.is_main:
            _write_results(run_dir, cfg, meta, state, source, data_info, finished=True)
            run_dir.set_status("finished", epoch=cfg.optim.epochs, step_in_epoch=0, global_step=state["global_step"])
        reporter.line(f"lincls finished: best top-1 {state['best_top1']:.2f} at epoch {state['best_epoch']}; "
                      f"results in {run_dir.path / 'results.json'}")
        return "finished"
    finally:
        reporter.close()


class BadImageCounts:
    """What both trainers share: the bad images met in train/ and in val/, counted per epoch."""

    def _count_bad_images(self, cfg: LinclsConfig, rt: Runtime, train: FolderIndex, val: FolderIndex) -> None:
        self.bad = BadImages(train.root, len(train.samples), cfg.data.max_bad_fraction, rt)
        self.val_bad = BadImages(val.root, len(val.samples), cfg.data.max_bad_fraction, rt)

    def bad_images(self) -> dict[str, int]:
        return {"bad_images": self.bad.count, "val_bad_images": self.val_bad.count}


class ImageTrainer(BadImageCounts):
    """The published protocol: every epoch reads and augments the images and runs the frozen backbone."""

    save_every_epoch = True

    def __init__(self, cfg: LinclsConfig, rt: Runtime, model: nn.Module, optimizer, scaler,
                 train: FolderIndex, val: FolderIndex, reporter: Reporter) -> None:
        self.cfg, self.rt, self.optimizer, self.scaler, self.reporter = cfg, rt, optimizer, scaler, reporter
        self.net = model
        if rt.distributed:
            self.net = DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
        size, pin = cfg.data.image_size, rt.device.type == "cuda"
        self.sampler = EpochSampler(len(train.samples), cfg.optim.batch_size, rt.rank, rt.world_size, cfg.run.seed)
        augment = lincls_train_transform(size, cfg.lincls.crop_scale, cfg.lincls.flip)
        self.loader = make_loader(SeededImages(train.samples, augment, report_skipped=True),
                                  self.sampler, cfg.data.workers, pin_memory=pin)
        self.val_loader = val_loader(cfg, rt, val)
        self._count_bad_images(cfg, rt, train, val)

    def train_epoch(self, epoch: int, first: int, lr: float, state: dict[str, Any], run_dir: RunDir,
                    save_if_due: Callable[[int, int], None]) -> int | None:
        """One epoch from step ``first``; the step it stopped at when a stop signal came, else None."""
        rt, steps = self.rt, self.sampler.steps
        self.sampler.set_epoch(epoch, first)
        self.bad.reset()
        self.reporter.start_epoch(epoch, self.cfg.optim.epochs, steps, first)
        interval = Interval()
        for i, (x, y, skipped) in enumerate(self.loader, start=first):
            if skipped:
                self.bad.add(skipped)  # undecodable images the loader replaced (host-side only)
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            with rt.autocast():
                logits = self.net(x)
            loss = _step(logits, y, self.optimizer, self.scaler)
            state["global_step"] += 1
            interval.add({"loss": loss, "acc1": topk_accuracy(logits.detach(), y, ks=(1,))[0]})
            done = i + 1
            if done % self.cfg.run.print_freq == 0 or done == steps:
                self.bad.agree(run_dir if rt.is_main else None, epoch, done)
                interval = _log_interval(interval, epoch, done, steps, lr, state, self.reporter,
                                         run_dir if rt.is_main else None, self.bad.shown())
                if done < steps:
                    save_if_due(epoch, done)
            if done < steps and rt.agreed_stop():
                accumulate(state, interval.read() if interval.count else {}, interval.count)
                return done
        return None

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.net, self.val_loader, self.rt, self.val_bad)


class CachedTrainer(BadImageCounts):
    """The fast variant: the frozen features are computed once; epochs train the linear layer on them.

    Every rank extracts a shard of the features and receives all of them, then trains the same
    classifier on the same global batches: no gradient traffic, the same result on every rank.
    """

    save_every_epoch = False

    def __init__(self, cfg: LinclsConfig, rt: Runtime, model: nn.Module, optimizer, scaler,
                 train: FolderIndex, val: FolderIndex, reporter: Reporter) -> None:
        self.cfg, self.rt, self.optimizer, self.scaler, self.reporter = cfg, rt, optimizer, scaler, reporter
        self.fc = last_linear(model)[2]
        size, views = cfg.data.image_size, cfg.lincls.augmented_views
        clock = time.perf_counter()
        transforms = [(eval_transform(size), None)] if views == 0 else [
            (lincls_train_transform(size, cfg.lincls.crop_scale, cfg.lincls.flip), v) for v in range(1, views + 1)]
        self._count_bad_images(cfg, rt, train, val)
        views_xy = [self._features(model, train, t, v, self.bad) for t, v in transforms]
        self.bad.agree()
        kept = torch.stack([y >= 0 for _, y in views_xy]).all(dim=0)  # undecodable images are left out
        self.train_x = torch.stack([x[kept] for x, _ in views_xy])  # (views, N, D)
        self.train_y = views_xy[0][1][kept]
        val_x, val_y = self._features(model, val, eval_transform(size), None, self.val_bad)
        self.val_bad.agree()
        self.val_x, self.val_y = val_x[val_y >= 0], val_y[val_y >= 0]
        reporter.line(f"lincls: features of {len(transforms)} view(s) x {len(train.samples)} train and "
                      f"{len(val.samples)} val images extracted in {time.perf_counter() - clock:.1f}s")
        self.steps = self.train_x.shape[1] // cfg.optim.batch_size

    def _features(self, model: nn.Module, index: FolderIndex, transform, view: int | None,
                  bad: BadImages) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image's features and label, in order (all ranks' shards); label -1 for an undecodable image."""
        rt, seed = self.rt, self.cfg.run.seed
        seed_of = None if view is None else (lambda i: derive_seed(seed, "view", view, i))
        sampler = ShardSampler(len(index.samples), rt.rank, rt.world_size, seed_of)
        loader = make_loader(SeededImages(index.samples, transform, report_skipped=True), sampler,
                             self.cfg.data.workers,
                             pin_memory=rt.device.type == "cuda",
                             batch_size=max(1, self.cfg.optim.batch_size // rt.world_size))
        parent, attr, fc = last_linear(model)
        setattr(parent, attr, nn.Identity())
        model.eval()
        try:
            with torch.no_grad():
                parts, labels = [], []
                for x, y, skipped in loader:
                    if skipped:
                        bad.add(skipped)
                        y[list(skipped)] = -1  # the row holds another image in place of a bad one
                    with rt.autocast():
                        parts.append(model(x.to(rt.device, non_blocking=True)).float())
                    labels.append(y.to(rt.device, non_blocking=True))
        finally:
            setattr(parent, attr, fc)
        local = torch.cat(parts) if parts else torch.empty(0, fc.in_features, device=rt.device)
        local_y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=rt.device)
        return rt.gather_shards(local, len(index.samples)), rt.gather_shards(local_y, len(index.samples))

    def train_epoch(self, epoch: int, first: int, lr: float, state: dict[str, Any], run_dir: RunDir,
                    save_if_due: Callable[[int, int], None]) -> None:
        """One epoch over the cached features; it takes milliseconds, so no checkpoint is written within it."""
        g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "order", epoch))
        order = torch.randperm(self.train_x.shape[1], generator=g).to(self.rt.device)
        view = torch.randint(self.train_x.shape[0], (self.train_x.shape[1],), generator=g).to(self.rt.device)
        batch = self.cfg.optim.batch_size
        self.reporter.start_epoch(epoch, self.cfg.optim.epochs, self.steps, 0)
        interval = Interval()
        for i in range(self.steps):
            idx = order[i * batch:(i + 1) * batch]
            x, y = self.train_x[view[idx], idx], self.train_y[idx]
            logits = self.fc(x)
            loss = _step(logits, y, self.optimizer, self.scaler)
            state["global_step"] += 1
            interval.add({"loss": loss, "acc1": topk_accuracy(logits.detach(), y, ks=(1,))[0]})
            if (i + 1) % self.cfg.run.print_freq == 0 or i + 1 == self.steps:
                interval = _log_interval(interval, epoch, i + 1, self.steps, lr, state, self.reporter,
                                         run_dir if self.rt.is_main else None)
        return None

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        acc1, acc5 = topk_accuracy(self.fc(self.val_x), self.val_y, ks=(1, 5))
        return acc1.item(), acc5.item()


def _step(logits: torch.Tensor, y: torch.Tensor, optimizer, scaler) -> torch.Tensor:
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def _log_interval(interval: Interval, epoch: int, done: int, steps: int, lr: float, state: dict[str, Any],
                  reporter: Reporter, run_dir: RunDir | None, bad: dict[str, int] | None = None) -> Interval:
    values = interval.read()
    check_finite(values, epoch, done, run_dir)
    accumulate(state, values, interval.count)
    reporter.step({"kind": "step", "epoch": epoch, "step": state["global_step"], "step_in_epoch": done, "lr": lr,
                   **values, **(bad or {})}, {**values, "lr": lr, **(bad or {})}, steps)
    return Interval()


def frozen_with_new_classifier(enc: Encoder, num_classes: int) -> nn.Module:
    """The pretrained backbone, every weight frozen, in eval mode, and a fresh trainable linear classifier."""
    model = enc.backbone_module(num_classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in last_linear(model)[2].parameters():
        p.requires_grad_(True)
    return model


def check_frozen(model: nn.Module, enc: Encoder) -> None:
    """Every backbone tensor still equals the checkpoint's; a RunError naming the ones that moved otherwise."""
    current = model.state_dict()
    moved = [k for k, v in enc.backbone.items() if k in current and not torch.equal(current[k].cpu(), v.cpu())]
    if moved:
        raise RunError(
            f"the frozen backbone changed during the first epoch ({len(moved)} tensors, e.g. {', '.join(moved[:3])}); "
            "a linear probe must leave it untouched, so this result would be meaningless",
            hint="This is a bug: please report it with the command you ran.",
        )


def val_loader(cfg: LinclsConfig, rt: Runtime, val: FolderIndex) -> DataLoader:
    """This rank's shard of val/, centre-cropped, a per-process batch at a time; bad images reported."""
    return make_loader(SeededImages(val.samples, eval_transform(cfg.data.image_size), report_skipped=True),
                       ShardSampler(len(val.samples), rt.rank, rt.world_size), cfg.data.workers,
                       pin_memory=rt.device.type == "cuda", batch_size=max(1, cfg.optim.batch_size // rt.world_size))


@torch.no_grad()
def evaluate(net: nn.Module, loader, rt: Runtime, bad: BadImages) -> tuple[float, float]:
    """Top-1 and top-5 (percent) over the whole val set: each rank counts its shard, the counts are summed.

    Undecodable images do not count (``bad`` collects them and stops the run above data.max_bad_fraction).
    """
    net.eval()
    bad.reset()
    counts = torch.zeros(3, dtype=torch.float64, device=rt.device)
    for x, y, skipped in loader:
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = net(x).float()
        if skipped:  # rows that stand in for undecodable images
            bad.add(skipped)
            rows = [r for r in range(len(y)) if r not in skipped]
            if not rows:
                continue
            keep = torch.tensor(rows, device=rt.device)
            logits, y = logits.index_select(0, keep), y.index_select(0, keep)
        acc1, acc5 = topk_accuracy(logits, y, ks=(1, 5))
        counts += torch.stack([acc1 * len(y) / 100, acc5 * len(y) / 100, torch.tensor(float(len(y)), device=rt.device)]).double()
    if rt.distributed:
        dist.all_reduce(counts)
    bad.agree()
    correct1, correct5, total = counts.tolist()
    return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1)


def _evaluate_only(cfg: LinclsConfig, rt: Runtime, enc: Encoder, val: FolderIndex, run_dir: RunDir) -> str:
    if enc.source != "mauctl-lincls":
        raise RunError(f"--evaluate needs a trained classifier; {enc.path} is a {enc.source} checkpoint")
    model = enc.backbone_module(enc.dim)
    model.load_state_dict(enc.state_dict())
    model.to(rt.device).eval()
    top1, top5 = evaluate(model, val_loader(cfg, rt, val),
                          rt, BadImages(val.root, len(val.samples), cfg.data.max_bad_fraction, rt))
    if rt.is_main:
        print(f"lincls --evaluate: {enc.path} on {len(val.samples)} val images: top-1 {top1:.2f}, top-5 {top5:.2f}")
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.write_json(run_dir.path / "evaluate.json", {"checkpoint": str(enc.path), "top1": top1, "top5": top5,
                                                             "val_images": len(val.samples)})
    return "finished"


def _source_info(enc: Encoder) -> dict[str, Any]:
    return {"source": enc.source, "path": str(enc.path), "run_dir": str(enc.run_dir) if enc.run_dir else None,
            "arch": enc.arch, "small_stem": enc.small_stem, "epoch": enc.epoch, "config_digest": enc.digest,
            "config": enc.config}


def _dataset_info(root: Path, train: FolderIndex, val: FolderIndex) -> dict[str, Any]:
    return {"root": str(root.resolve()), "classes": len(train.classes), "train_images": len(train.samples),
            "val_images": len(val.samples), "class_list_sha256": class_list_digest(train.classes)}


def _write_results(run_dir: RunDir, cfg: LinclsConfig, meta: dict[str, Any], state: dict[str, Any],
                   source: dict[str, Any], data_info: dict[str, Any], finished: bool) -> None:
    last = state["history"][-1] if state["history"] else {}
    o = cfg.optim
    run_dir.write_json(run_dir.path / "results.json", {
        "format": RESULTS_FORMAT,
        "name": meta.get("name", run_dir.path.name),
        "finished": finished,
        "top1": last.get("top1"),
        "top5": last.get("top5"),
        "best_top1": state["best_top1"],
        "best_epoch": state["best_epoch"],
        "epochs_done": len(state["history"]),
        "wall_time_s": state["wall_time_s"],
        "protocol": {"kind": "cached-features" if cfg.lincls.cached_features else "per-epoch",
                     "augmented_views": cfg.lincls.augmented_views, "epochs": o.epochs, "lr": o.lr, "batch_size": o.batch_size,
                     "schedule": list(o.schedule), "cos": o.cos, "momentum": o.momentum,
                     "weight_decay": o.weight_decay, "image_size": cfg.data.image_size,
                     "crop_scale": cfg.lincls.crop_scale, "flip": cfg.lincls.flip, "dataset": data_info},
        "pretrain": source,
        "history": state["history"],
    })


def _checkpoint(cfg: LinclsConfig, model: nn.Module, optimizer, scaler, state: dict[str, Any], epoch: int,
                step_in_epoch: int, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": state["global_step"],
        "epoch_sums": dict(state["sums"]),
        "epoch_count": state["count"],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "config": cfg.model_dump(),
        "source": source,
        "history": state["history"],
        "wall_time_s": state["wall_time_s"],
        "summary": {"best_top1": state["best_top1"], "best_epoch": state["best_epoch"]},
    }


def _resume(cfg: LinclsConfig, rt: Runtime, run_dir: RunDir, model: nn.Module, optimizer, scaler,
            state: dict[str, Any]) -> Path | None:
    path, ckpt = resume_checkpoint(run_dir, cfg.run.resume, rt, FORMAT, "linear-probe")
    if path is None:
        return None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    summary = ckpt.get("summary", {})
    state.update(epoch=int(ckpt["epoch"]), step_in_epoch=int(ckpt["step_in_epoch"]),
                 global_step=int(ckpt["global_step"]), sums=dict(ckpt.get("epoch_sums", {})),
                 count=int(ckpt.get("epoch_count", 0)), history=list(ckpt.get("history", [])),
                 best_top1=float(summary.get("best_top1", -1.0)), best_epoch=int(summary.get("best_epoch", 0)),
                 wall_time_s=float(ckpt.get("wall_time_s", 0.0)))
    return path
