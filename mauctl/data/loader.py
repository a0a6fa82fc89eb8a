"""Batches for training: a sampler that fixes the global batches, a dataset that seeds each sample.

Reproducibility is by construction rather than by saved RNG states: the order of an epoch
depends only on (seed, epoch), and the augmentation of a sample only on (seed, epoch, index).
So results do not depend on the number of loader workers, and a run resumed in the middle of
an epoch draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from mauctl.engine.runtime import STOP_SIGNALS, derive_seed


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


def open_image(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img


class SeededImages(Dataset):
    """``dataset[(index, seed)]`` -> (transform(image), label), the transform's randomness seeded by ``seed``."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        path, label = self.samples[index]
        img = open_image(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), label


def _ignore_stop_signals(worker_id: int) -> None:
    # A stop signal is the training process's to handle (finish the step, save); a loader worker
    # that died of it would instead break the step in flight.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: Sampler, workers: int, pin_memory: bool,
                batch_size: int | None = None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size or sampler.per_rank,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals,
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
