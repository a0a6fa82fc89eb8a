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

import contextlib
import time
from collections.abc import Iterator
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
from mauctl.engine.checkpoint import LINCLS_FORMAT, Checkpointer, ProbeState
from mauctl.engine.loop import StepLog, start_epoch, start_run, stopped
from mauctl.engine.progress import Reporter
from mauctl.engine.rundir import RunDir
from mauctl.engine.runtime import Runtime, derive_seed, seed_everything
from mauctl.errors import RunError
from mauctl.losses import topk_accuracy
from mauctl.text import plural
from mauctl.weights import Encoder, read_encoder

RESULTS_FORMAT = "mauctl.lincls-results/1"


def run(config: LinclsConfig, runtime: Runtime, meta: dict[str, Any]) -> str:
    """Train the probe; return "finished", or "stopped" when a stop signal arrived (after saving)."""
    cfg, rt = config, runtime
    run_dir, state = RunDir(Path(cfg.run.out)), ProbeState()
    enc, root = read_encoder(meta["source"]), Path(meta["data_root"])
    train, val = scan_split(root, "train"), scan_split(root, "val")
    if meta.get("evaluate"):
        return _evaluate_only(cfg, rt, enc, val, run_dir)
    probe = Probe(cfg, rt, enc, len(train.classes))
    checkpoints = Checkpointer(run_dir, rt, LINCLS_FORMAT, cfg, probe.parts(), {"source": _source_info(enc)},
                               save_minutes=cfg.run.save_minutes, keep_best=True,
                               every_epoch=not cfg.lincls.cached_features)
    resumed_from = checkpoints.resume(state, cfg.run.resume)
    log = start_run(run_dir, cfg, rt, meta, train.summary(), "lincls", resumed_from, state, source=str(enc.path))
    reporter = Reporter(rt.is_main, "lincls", log, cfg.optim.epochs)
    results = Results(run_dir, rt, cfg, meta, enc, root, train, val)
    try:
        reporter.line(_first_line(cfg, rt, enc, train, val, resumed_from, state))
        built = time.perf_counter()
        trainer = (CachedTrainer if cfg.lincls.cached_features else ImageTrainer)(cfg, rt, probe, train, val, reporter,
                                                                               state, run_dir)
        state.wall_time_s += time.perf_counter() - built  # the cached features' extraction is part of the probe
        for epoch in range(state.epoch, cfg.optim.epochs):
            clock = time.perf_counter()
            lr, first = start_epoch(probe.optimizer, cfg.optim, state, epoch)
            probe.model.eval()  # the backbone's BatchNorm keeps its pretrained statistics, as in main_lincls.py
            signum = trainer.train_epoch(epoch, first, lr, checkpoints)
            if signum:
                state.wall_time_s += time.perf_counter() - clock
                checkpoints.stopping(state)
                return stopped(reporter, run_dir, rt, "lincls", signum, state)
            if epoch == 0 and first == 0:
                check_frozen(probe.model, enc)
            best = state.end_epoch(*trainer.evaluate(), lr)
            state.wall_time_s += time.perf_counter() - clock
            final = state.epoch == cfg.optim.epochs
            checkpoints.end_epoch(state, best=best, final=final)
            results.write(state, finished=final)
            reporter.end_epoch(*_epoch_record(state, trainer.bad.counts()))
            signum = rt.agreed_stop()
            if signum and not final:
                checkpoints.stopping(state)
                return stopped(reporter, run_dir, rt, "lincls", signum, state)
        if rt.is_main:
            run_dir.set_status("finished", epoch=cfg.optim.epochs, step_in_epoch=0, global_step=state.global_step)
        reporter.line(f"lincls finished: best top-1 {state.best_top1:.2f} at epoch {state.best_epoch}; "
                      f"results in {results.path}")
        return "finished"
    finally:
        reporter.close()


def _first_line(cfg: LinclsConfig, rt: Runtime, enc: Encoder, train: FolderIndex, val: FolderIndex,
                resumed_from: Path | None, state: ProbeState) -> str:
    kind = "cached features" if cfg.lincls.cached_features else "per-epoch"
    return (f"lincls ({kind}): {enc.arch} from {enc.path} ({enc.source}), "
            f"{plural(len(train.classes), 'class', 'classes')}, {len(train.samples):,} train / "
            f"{len(val.samples):,} val images, world size {rt.world_size} on {rt.device.type}"
            + (f", resuming at epoch {state.epoch + 1}" if resumed_from else ""))


def _epoch_record(state: ProbeState, bad: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The epoch's record for metrics.jsonl and what its line shows (``state.history`` holds the epoch)."""
    last = state.history[-1]
    record = {"kind": "epoch", "epoch": state.epoch - 1, "step": state.global_step, "lr": last["lr"],
              "train_loss": last["train_loss"], "train_acc1": last["train_acc1"], "top1": last["top1"],
              "top5": last["top5"], **bad}
    shown = {"loss": last["train_loss"] or 0.0, "top1": last["top1"], "top5": last["top5"], "best": state.best_top1,
             **{k: v for k, v in bad.items() if v}}
    return record, shown


class Probe:
    """The frozen backbone with a new linear classifier, and what trains the classifier."""

    def __init__(self, cfg: LinclsConfig, rt: Runtime, enc: Encoder, num_classes: int) -> None:
        seed_everything(cfg.run.seed)
        self.model = frozen_with_new_classifier(enc, num_classes).to(rt.device)
        self.fc = last_linear(self.model)[2]
        self.optimizer = torch.optim.SGD(self.fc.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    def parts(self) -> dict[str, Any]:
        """What a checkpoint saves and a resume restores (engine/checkpoint.py lists the layout)."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}

    def step(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SGD step of the classifier on ``logits``; the loss and top-1 as device tensors."""
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss, "acc1": topk_accuracy(logits.detach(), y, ks=(1,))[0]}


class BadImageCounts:
    """The bad images met in train/ and in val/, counted per epoch (per extraction for cached features)."""

    def __init__(self, cfg: LinclsConfig, rt: Runtime, train: FolderIndex, val: FolderIndex) -> None:
        self.train = BadImages(train.root, len(train.samples), cfg.data.max_bad_fraction, rt)
        self.val = BadImages(val.root, len(val.samples), cfg.data.max_bad_fraction, rt)

    def counts(self) -> dict[str, int]:
        return {"bad_images": self.train.count, "val_bad_images": self.val.count}


class ImageTrainer:
    """The published protocol: every epoch reads and augments the images and runs the frozen backbone."""

    def __init__(self, cfg: LinclsConfig, rt: Runtime, probe: Probe, train: FolderIndex, val: FolderIndex,
                 reporter: Reporter, state: ProbeState, run_dir: RunDir) -> None:
        self.cfg, self.rt, self.probe, self.state = cfg, rt, probe, state
        self.bad = BadImageCounts(cfg, rt, train, val)
        self.log = StepLog(reporter, state, rt, run_dir, cfg.run.print_freq, cfg.optim.batch_size, self.bad.train)
        self.net = probe.model
        if rt.distributed:
            self.net = DistributedDataParallel(self.net, device_ids=[rt.device] if rt.device.type == "cuda" else None)
        self.sampler = EpochSampler(len(train.samples), cfg.optim.batch_size, rt.rank, rt.world_size, cfg.run.seed)
        augment = lincls_train_transform(cfg.data.image_size, cfg.lincls.crop_scale, cfg.lincls.flip)
        self.loader = make_loader(SeededImages(train.samples, augment, report_skipped=True),
                                  self.sampler, cfg.data.workers, pin_memory=rt.device.type == "cuda")
        self.val_loader = val_loader(cfg, rt, val)

    def train_epoch(self, epoch: int, first: int, lr: float, checkpoints: Checkpointer) -> int:
        """One epoch from step ``first``; the stop signal that came within it (0 if none)."""
        rt, steps = self.rt, self.sampler.steps
        self.sampler.set_epoch(epoch, first)
        self.log.start_epoch(steps, first, lr)
        for x, y, skipped in self.loader:
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            with rt.autocast():
                logits = self.net(x)
            if self.log.add(self.probe.step(logits, y), skipped) and self.state.step_in_epoch < steps:
                checkpoints.save_if_due(self.state)
            signum = rt.agreed_stop()
            if signum and self.state.step_in_epoch < steps:
                self.log.flush()
                return signum
        return 0

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.net, self.val_loader, self.rt, self.bad.val)


class CachedTrainer:
    """The fast variant: the frozen features are computed once; epochs train the linear layer on them.

    Every rank extracts a shard of the features and receives all of them, then trains the same
    classifier on the same global batches: no gradient traffic, the same result on every rank.
    An epoch takes milliseconds: no checkpoint is written and no stop is honoured within one.

    The features are held once, in the dtype the backbone yields (bf16 under bf16 autocast: half the
    bytes of fp32, widened a batch at a time, which loses nothing): each batch is written into place
    in one (views, N, D) tensor, the other ranks' rows are gathered into place, and the rows of bad
    images are dropped in place.
    """

    def __init__(self, cfg: LinclsConfig, rt: Runtime, probe: Probe, train: FolderIndex, val: FolderIndex,
                 reporter: Reporter, state: ProbeState, run_dir: RunDir) -> None:
        self.cfg, self.rt, self.probe = cfg, rt, probe
        self.bad = BadImageCounts(cfg, rt, train, val)
        self.log = StepLog(reporter, state, rt, run_dir, cfg.run.print_freq, cfg.optim.batch_size)
        size, views = cfg.data.image_size, cfg.lincls.augmented_views
        clock = time.perf_counter()
        transforms = [(eval_transform(size), None)] if views == 0 else [
            (lincls_train_transform(size, cfg.lincls.crop_scale, cfg.lincls.flip), v) for v in range(1, views + 1)]
        with torch.no_grad(), features_only(probe.model.eval()) as model:
            with rt.autocast():  # one blank image: the features' width, and the dtype that holds them exactly
                blank = model(torch.zeros(1, 3, size, size, device=rt.device))
            self.train_x, self.train_y = self._cached(model, train, transforms, self.bad.train, blank)
            val_x, self.val_y = self._cached(model, val, [(eval_transform(size), None)], self.bad.val, blank)
            self.val_x = val_x[0]
        reporter.line(f"lincls: features of {plural(len(transforms), 'view')} x {len(train.samples):,} train and "
                      f"{len(val.samples):,} val images extracted in {time.perf_counter() - clock:.1f}s")
        self.steps = self.train_x.shape[1] // cfg.optim.batch_size

    def _cached(self, model: nn.Module, index: FolderIndex, transforms: list, bad: BadImages,
                blank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of every view of the decodable images, (views, N, D) like ``blank``'s rows; their labels."""
        rows = blank.new_empty(len(transforms), len(index.samples), blank.shape[1])
        labels = [self._features(model, index, t, v, bad, rows[i]) for i, (t, v) in enumerate(transforms)]
        bad.agree()
        kept = torch.stack(labels).amin(dim=0) >= 0  # undecodable images are left out
        return keep_rows(rows, kept), labels[0][kept]

    def _features(self, model: nn.Module, index: FolderIndex, transform, view: int | None, bad: BadImages,
                  rows: torch.Tensor) -> torch.Tensor:
        """Every image's features written into ``rows``, in order (all ranks' shards); every image's label,
        -1 for an undecodable image."""
        rt, seed = self.rt, self.cfg.run.seed
        seed_of = None if view is None else (lambda i: derive_seed(seed, "view", view, i))
        sampler = ShardSampler(len(index.samples), rt.rank, rt.world_size, seed_of)
        loader = make_loader(SeededImages(index.samples, transform, report_skipped=True), sampler,
                             self.cfg.data.workers, pin_memory=rt.device.type == "cuda",
                             batch_size=max(1, self.cfg.optim.batch_size // rt.world_size))
        labels = torch.empty(len(index.samples), dtype=torch.long, device=rt.device)
        mine, my_labels, done = rows[rt.rank::rt.world_size], labels[rt.rank::rt.world_size], 0  # ShardSampler's
        for x, y, skipped in loader:
            if skipped:
                bad.add(skipped)
                y[list(skipped)] = -1  # the row holds another image in place of a bad one
            with rt.autocast():
                features = model(x.to(rt.device, non_blocking=True))
            mine[done:done + len(y)] = features
            my_labels[done:done + len(y)] = y.to(rt.device, non_blocking=True)
            done += len(y)
        rt.fill_shards(rows)
        return rt.fill_shards(labels)

    def train_epoch(self, epoch: int, first: int, lr: float, checkpoints: Checkpointer) -> int:
        """One epoch over the cached features (always whole: ``first`` is 0); 0, as no stop is taken within it."""
        g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "order", epoch))
        order = torch.randperm(self.train_x.shape[1], generator=g).to(self.rt.device)
        view = torch.randint(self.train_x.shape[0], (self.train_x.shape[1],), generator=g).to(self.rt.device)
        batch = self.cfg.optim.batch_size
        self.log.start_epoch(self.steps, 0, lr)
        for i in range(self.steps):
            idx = order[i * batch:(i + 1) * batch]
            x, y = self.train_x[view[idx], idx].float(), self.train_y[idx]
            self.log.add(self.probe.step(self.probe.fc(x), y))
        return 0

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        acc1, acc5 = topk_accuracy(self.probe.fc(self.val_x.float()), self.val_y, ks=(1, 5))
        return acc1.item(), acc5.item()


def frozen_with_new_classifier(enc: Encoder, num_classes: int) -> nn.Module:
    """The pretrained backbone, every weight frozen, in eval mode, and a fresh trainable linear classifier."""
    model = enc.backbone_module(num_classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in last_linear(model)[2].parameters():
        p.requires_grad_(True)
    return model


@contextlib.contextmanager
def features_only(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its final linear layer replaced by the identity: it returns the features the layer reads."""
    parent, attr, fc = last_linear(model)
    setattr(parent, attr, nn.Identity())
    try:
        yield model
    finally:
        setattr(parent, attr, fc)


def keep_rows(rows: torch.Tensor, kept: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``rows[..., kept, :]`` without a second copy of ``rows``: the kept rows move forward in place, a
    chunk at a time, and the front part is returned (a view). The j-th kept row is row j or a later one,
    so no row is overwritten before it is read."""
    index = kept.nonzero().squeeze(1)
    if len(index) == len(kept):
        return rows
    for first in range(0, len(index), chunk):
        part = index[first:first + chunk]
        rows[..., first:first + len(part), :] = rows[..., part, :]
    return rows[..., :len(index), :]


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
    # counted on the device and read once at the end: no batch waits for the device
    counts = torch.zeros(3, dtype=torch.int64, device=rt.device)  # top-1 hits, top-5 hits, images
    for x, y, skipped in loader:
        if skipped:  # rows that stand in for undecodable images: label -1 (on the host), counted nowhere
            bad.add(skipped)
            for row in skipped:
                y[row].fill_(-1)
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = net(x).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.unsqueeze(1)
        counts += torch.stack([hit[:, :1].any(dim=1).sum(), hit.any(dim=1).sum(), (y >= 0).sum()])
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
    return {"source": enc.source, "path": str(enc.path.resolve()), "run_dir": str(enc.run_dir) if enc.run_dir else None,
            "arch": enc.arch, "small_stem": enc.small_stem, "epoch": enc.epoch, "config_digest": enc.digest,
            "config": enc.config}


class Results:
    """``<out>/results.json``, rewritten after every epoch (the module docstring lists its fields)."""

    def __init__(self, run_dir: RunDir, rt: Runtime, cfg: LinclsConfig, meta: dict[str, Any], enc: Encoder,
                 root: Path, train: FolderIndex, val: FolderIndex) -> None:
        self.run_dir, self.path, self.cfg, self.name = run_dir, run_dir.path / "results.json", cfg, meta.get("name")
        self.is_main = rt.is_main
        self.source = _source_info(enc)
        self.dataset = {"root": str(root.resolve()), "classes": len(train.classes), "train_images": len(train.samples),
                        "val_images": len(val.samples), "class_list_sha256": class_list_digest(train.classes)}

    def write(self, state: ProbeState, finished: bool) -> None:
        if not self.is_main:
            return
        last = state.history[-1] if state.history else {}
        o, p = self.cfg.optim, self.cfg.lincls
        self.run_dir.write_json(self.path, {
            "format": RESULTS_FORMAT, "name": self.name or self.run_dir.path.name, "finished": finished,
            "top1": last.get("top1"), "top5": last.get("top5"), "best_top1": state.best_top1,
            "best_epoch": state.best_epoch, "epochs_done": len(state.history), "wall_time_s": state.wall_time_s,
            "protocol": {"kind": "cached-features" if p.cached_features else "per-epoch",
                         "augmented_views": p.augmented_views, "epochs": o.epochs, "lr": o.lr,
                         "batch_size": o.batch_size, "schedule": list(o.schedule), "cos": o.cos,
                         "momentum": o.momentum, "weight_decay": o.weight_decay,
                         "image_size": self.cfg.data.image_size, "crop_scale": p.crop_scale, "flip": p.flip,
                         "dataset": self.dataset},
            "pretrain": self.source,
            "history": state.history,
        })
