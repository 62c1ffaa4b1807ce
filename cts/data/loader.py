"""Data loaders whose sample order and augmentation depend only on (seed, epoch, index).

The sampler runs in the main process and hands each worker a :class:`SampleKey`
``(index, seed, epoch)``; the dataset derives the sample's random generator from that key.
Nothing depends on global RNG state, the worker count or which worker loads a sample, and
persistent workers need no epoch broadcast.

Usage::

    loader = build_loader(dataset, batch_size=8, shuffle=True, num_workers=4, seed=0)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader: ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class SampleKey(NamedTuple):
    """Which sample to load and the randomness to load it with."""

    index: int
    seed: int = 0
    epoch: int = 0


def sample_rng(key: SampleKey) -> np.random.Generator:
    """Random generator of one sample, a pure function of ``(seed, epoch, index)``."""
    return np.random.default_rng((key.seed, key.epoch, key.index))


class EpochSampler(Sampler[SampleKey]):
    """Yields the :class:`SampleKey` s of one epoch; call :meth:`set_epoch` before each.

    Args:
        dataset: anything with ``__len__``.
        shuffle: random order, a function of ``(seed, epoch)``.
        seed: seeds both the order and every sample's augmentation.
        distributed: this rank's share of the keys via ``DistributedSampler`` (requires an
            initialised process group).
        drop_last: with ``distributed``, drop the tail instead of padding every rank to the
            same length.
    """

    def __init__(
        self,
        dataset: Sized,
        shuffle: bool,
        seed: int,
        distributed: bool = False,
        drop_last: bool = False,
    ) -> None:
        self.num_samples = len(dataset)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.ranks = (
            DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
            if distributed
            else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.ranks is not None:
            self.ranks.set_epoch(epoch)

    def _indices(self) -> list[int]:
        if self.ranks is not None:
            return list(self.ranks)
        if self.shuffle:
            return (
                np.random.default_rng((self.seed, self.epoch))
                .permutation(self.num_samples)
                .tolist()
            )
        return list(range(self.num_samples))

    def __iter__(self) -> Iterator[SampleKey]:
        return iter([SampleKey(i, self.seed, self.epoch) for i in self._indices()])

    def __len__(self) -> int:
        return len(self.ranks) if self.ranks is not None else self.num_samples


def _init_worker(worker_id: int) -> None:
    # Each loader worker is one process already; OpenCV's own thread pool per worker would
    # oversubscribe the cores.
    cv2.setNumThreads(1)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool,
    distributed: bool = False,
) -> DataLoader:
    """DataLoader over ``dataset`` (indexable by :class:`SampleKey`) with an :class:`EpochSampler`.

    Memory is pinned when CUDA is available and workers persist across epochs. Set the
    epoch with ``loader.sampler.set_epoch(epoch)``.
    """
    sampler = EpochSampler(dataset, shuffle, seed, distributed=distributed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        # Its own generator: drawing worker seeds from the global one would shift the model's
        # random stream (dropout, drop-path) at every epoch start and break exact resuming.
        generator=torch.Generator().manual_seed(seed),
    )
