"""Batches for training: a sampler that fixes the global batches, a dataset that seeds each sample.

Reproducibility is by construction rather than by saved RNG states: the order of an epoch
depends only on (seed, epoch), and the augmentation of a sample only on (seed, epoch, index).
So results do not depend on the number of loader workers, and a run resumed in the middle of
an epoch draws exactly what an uninterrupted one would.

Bad images (truncated, empty, not an image, too large, deleted since the folder was scanned) do
not stop a run by themselves: the dataset serves the next image of the list that decodes in their
place, so batches keep their shape and runs their determinism, and reports the ones it skipped
beside the batch (an extra field, since loader workers are other processes). ``BadImages``
counts them per epoch over all ranks and stops the run once more than ``data.max_bad_fraction``
of the images are bad.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from mauctl.data.augment import to_rgb
from mauctl.engine.runtime import STOP_SIGNALS, derive_seed
from mauctl.errors import RunError

# Bad images tried in a row for one sample before a blank image stands in (the run stops anyway:
# that many bad images in a row exceed any sensible data.max_bad_fraction).
MAX_TRIES = 64
LISTED = 20  # bad images named in the message that stops a run


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)`` for this rank's share of each global batch.

    Global batch s of an epoch is positions [s*B, (s+1)*B) of a permutation of the dataset, and
    rank r takes the contiguous slice [r*b, (r+1)*b) of it: the global batches are the same for
    any number of processes. The incomplete last batch is dropped, as in the original.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True) -> None:
        self.size = size
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_step = 0

    @property
    def steps(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        for step in range(self.start_step, self.steps):
            first = step * self.global_batch + self.rank * self.per_rank
            for index in order[first : first + self.per_rank]:
                yield index, derive_seed(self.seed, "augment", self.epoch, index)


def decode_image(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (greyscale, CMYK, 16-bit, palette and alpha converted).

    Raises whatever Pillow or the file system raises for a file that is not a decodable image,
    including Pillow's DecompressionBombError above 2 x ``Image.MAX_IMAGE_PIXELS`` (about 179
    megapixels by default): decoding such a file would take gigabytes per loader worker.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


def why_bad(path: str, exc: Exception) -> str:
    """What is wrong with the image at ``path``, in a few words, from what decoding it raised."""
    if isinstance(exc, FileNotFoundError):
        return "deleted since the folder was scanned"
    if isinstance(exc, UnidentifiedImageError):
        empty = os.path.exists(path) and os.path.getsize(path) == 0
        return "empty file" if empty else "not an image file Pillow can read"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too large to decode safely ({exc})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, OSError) and "truncated" in text.lower():
        return f"truncated file ({text})"
    return f"{type(exc).__name__}: {text}"[:200]


Skipped = tuple[tuple[str, str], ...]  # (path, reason) of each bad image skipped for one sample


class SeededImages(Dataset):
    """``dataset[(index, seed)]`` -> (transform(image), label), the transform's randomness seeded by ``seed``.

    An image that does not decode is replaced by the next one in ``samples`` that does (usually
    of the same class: samples are sorted by class), transformed with the same seed. With
    ``report_skipped`` the item is (transform(image), label, skipped), ``skipped`` the (path,
    reason) of each image passed over for it; `make_loader` collates those into a dict
    {row: skipped} holding only the rows that had any.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable,
                 report_skipped: bool = False) -> None:
        self.samples = samples
        self.transform = transform
        self.report_skipped = report_skipped

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        img, label, skipped = first_decodable(self.samples, index, decode_image)
        if img is None:  # only bad images around this one: a blank stands in, and the bad count stops the run
            img = Image.new("RGB", (32, 32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.transform(img)
        return (x, label, skipped) if self.report_skipped else (x, label)


def first_decodable(samples: Sequence[tuple[str, int]], index: int,
                    decode: Callable[[str], Any]) -> tuple[Any, int, Skipped]:
    """(decode(path), label, skipped) for sample ``index``, or for the next one in ``samples`` that decodes.

    The bad-image policy of every dataset here: ``skipped`` holds the (path, reason) of each image
    passed over. After MAX_TRIES bad images in a row the image is None (the caller puts a blank in
    its place) and the label that of ``index``.
    """
    skipped: list[tuple[str, str]] = []
    for tried in range(min(MAX_TRIES, len(samples))):
        path, label = samples[(index + tried) % len(samples)]
        try:
            return decode(path), label, tuple(skipped)
        except Exception as exc:  # any file that does not decode is skipped, whatever the decoder raises
            skipped.append((path, why_bad(path, exc)))
    return None, samples[index][1], tuple(skipped)


def collate(batch: list[tuple]) -> tuple:
    """default_collate, except the items' skipped images (last field, if the dataset reports them):
    a dict {row in the batch: skipped}, empty when every image decoded."""
    if len(batch[0]) < 3:
        return default_collate(batch)
    skipped = {row: item[-1] for row, item in enumerate(batch) if item[-1]}
    return (*default_collate([item[:-1] for item in batch]), skipped)


class BadImages:
    """The bad images one split met in the current epoch, over all ranks, and the rule that stops a run.

    ``add`` takes what the loader reported beside a batch (host-side Python only, no device work);
    ``agree`` merges every rank's findings, a collective that every rank must call at the same
    step, and raises RunError once more than ``max_fraction`` of the split's images are bad.
    """

    def __init__(self, root: Path | str, total: int, max_fraction: float, runtime: Any) -> None:
        self.root, self.total, self.max_fraction, self.rt = Path(root), total, max_fraction, runtime
        self.found: dict[str, str] = {}  # path -> reason, this epoch
        self.count = 0  # over all ranks, as of the last ``agree``

    def reset(self) -> None:
        self.found, self.count = {}, 0

    def add(self, skipped: dict[int, Skipped]) -> None:
        for pairs in skipped.values():
            for path, reason in pairs:
                self.found.setdefault(path, reason)

    def agree(self, run: Any = None, epoch: int = 0, step: int = 0) -> int:
        """The number of bad images met this epoch by any rank; stops the run above the limit.

        ``run``: the RunDir whose status is set to failed (rank 0's), or None.
        """
        if self.rt.distributed:
            for part in self.rt.gather_objects(self.found):
                for path, reason in (part or {}).items():
                    self.found.setdefault(path, reason)
        self.count = len(self.found)
        if self.count > self.max_fraction * self.total:
            if run is not None:
                run.set_status("failed", epoch=epoch, step_in_epoch=step, reason="undecodable images",
                               bad_images=self.count)
            if not getattr(self.rt, "is_main", True):  # every rank stops here; rank 0 lists the files
                raise RunError(f"{self.count} undecodable images in {self.root}: "
                               "stopping with rank 0, which lists them")
            raise RunError(self.message(), hint=(
                "Fix or remove these files, then run the same command (it resumes from the last checkpoint); "
                "or let the run skip them with a higher data.max_bad_fraction "
                f"(e.g. --set data.max_bad_fraction={_suggest(self.count, self.total)})."))
        return self.count

    def shown(self) -> dict[str, int]:
        """{"bad_images": n} for a progress line or record when there were any, else nothing."""
        return {"bad_images": self.count} if self.count else {}

    def message(self) -> str:
        shown = [f"  {path}: {reason}" for path, reason in sorted(self.found.items())[:LISTED]]
        if self.count > LISTED:
            shown.append(f"  and {self.count - LISTED} more")
        share = 100 * self.count / max(self.total, 1)
        return (f"{self.count} of the {self.total} images in {self.root} could not be decoded this epoch "
                f"({share:.2g}%, above data.max_bad_fraction = {self.max_fraction:g}); the run stops rather than "
                "train on a damaged dataset:\n" + "\n".join(shown))


def _suggest(count: int, total: int) -> str:
    """A round fraction a little above count / total."""
    fraction = count / max(total, 1)
    for candidate in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        if candidate > fraction:
            return f"{candidate:g}"
    return "1"


def _ignore_stop_signals(worker_id: int) -> None:
    # A stop signal is the training process's to handle (finish the step, save); a loader worker
    # that died of it would instead break the step in flight.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


AUTO_WORKERS_MAX = 8


def worker_count(workers: int | str, processes: int | None = None) -> int:
    """data.workers, with "auto" = this process's share of the CPU cores it may run on, 1 to AUTO_WORKERS_MAX.

    The share counts ``processes``, by default those torchrun started on this node (LOCAL_WORLD_SIZE): on 2 cores, one
    training process gets 2 workers, two get 1 each (more only compete for the cores, and torch warns).
    """
    if workers != "auto":
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if processes is None:  # the processes torchrun started on this node
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(AUTO_WORKERS_MAX, cores // max(processes, 1)))


def make_loader(dataset: Dataset, sampler: Sampler, workers: int | str, pin_memory: bool,
                batch_size: int | None = None, persistent: bool = True,
                collate_fn: Callable[[list[tuple]], Any] = collate) -> DataLoader:
    """``workers``: data.workers ("auto" allowed); ``persistent``: keep the worker processes between epochs
    (not for a loader read once in a while)."""
    workers = worker_count(workers)
    return DataLoader(
        dataset,
        batch_size=batch_size or sampler.per_rank,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals,
        collate_fn=collate_fn,
    )


class ShardSampler(Sampler):
    """Every ``world_size``-th image from ``rank`` on (each exactly once over all ranks), in order.

    ``seed_of(index)`` seeds each image's transform (a fixed augmented view); the default is 0.
    """

    def __init__(self, size: int, rank: int, world_size: int,
                 seed_of: Callable[[int], int] | None = None) -> None:
        self.indices = list(range(rank, size, world_size))
        self.seed_of = seed_of or (lambda index: 0)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, self.seed_of(index)) for index in self.indices)
