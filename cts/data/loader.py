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

import os
from collections.abc import Iterator, Sized
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


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
        distributed: this process's share of the keys (requires an initialised process
            group): every W-th key of the one-process order, from the rank on. Consecutive
            per-process batches then make up exactly the global batches of one process.
            Nothing is padded with duplicates, so an evaluation counts every sample once.
        drop_last: with ``distributed``, first drop the tail that does not divide over the
            processes, so that every process runs the same number of batches (training).
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
        self.rank, self.world_size = (
            (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        )
        self.used = self.num_samples
        if drop_last:
            self.used -= self.num_samples % self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[: self.used][self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        return iter([SampleKey(i, self.seed, self.epoch) for i in self._indices()])

    def __len__(self) -> int:
        return len(range(self.rank, self.used, self.world_size))


def _init_worker(worker_id: int) -> None:
    # Each loader worker is one process already; OpenCV's own thread pool per worker would
    # oversubscribe the cores.
    cv2.setNumThreads(1)


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    """``auto``: none on CPU, where the step itself keeps every core busy; on a GPU, the cores
    of this process's share of the machine less the one that drives the GPU, at most 8."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type != "cuda":
        return 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(max(len(os.sched_getaffinity(0)) // processes - 1, 1), 8)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int | str,
    seed: int,
    drop_last: bool,
    distributed: bool = False,
    device: torch.device | str = "cpu",
) -> DataLoader:
    """DataLoader over ``dataset`` (indexable by :class:`SampleKey`) with an :class:`EpochSampler`.

    ``num_workers`` may be ``auto`` (:func:`resolve_num_workers`). Memory is pinned when the
    batches go to a CUDA ``device``; workers start from a forkserver and persist across
    epochs. Set the epoch with ``loader.sampler.set_epoch(epoch)``.
    """
    device = torch.device(device)
    num_workers = resolve_num_workers(num_workers, device)
    sampler = EpochSampler(dataset, shuffle, seed, distributed=distributed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        # Not fork: forking copies the locks other threads (MLflow's async logging, the
        # tracking spool) hold at that moment, and a worker that needs one hangs for good.
        multiprocessing_context="forkserver" if num_workers > 0 else None,
        # Its own generator: drawing worker seeds from the global one would shift the model's
        # random stream (dropout, drop-path) at every epoch start and break exact resuming.
        generator=torch.Generator().manual_seed(seed),
    )
