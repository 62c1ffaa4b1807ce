"""Loaders: results depend on (seed, epoch, index) only, not on workers or global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from cts.data.folder import SegmentationFolder
from cts.data.loader import EpochSampler, SampleKey, build_loader
from cts.data.transforms import TrainTransform


def batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(b["name"], b["image"], b["label"]) for b in loader]


def same(a, b):
    return all(
        na == nb and torch.equal(ia, ib) and torch.equal(la, lb)
        for (na, ia, la), (nb, ib, lb) in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def dataset(tiny_synthetic):
    transform = TrainTransform(base_size=128, crop_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    return SegmentationFolder(tiny_synthetic, "train", transform)


def test_worker_count_and_global_rng_do_not_matter(dataset):
    serial = build_loader(dataset, 2, shuffle=True, num_workers=0, seed=3, drop_last=False)
    first = batches(serial, epoch=1)
    torch.manual_seed(123)
    np.random.seed(123)
    assert same(first, batches(serial, epoch=1))
    parallel = build_loader(dataset, 2, shuffle=True, num_workers=2, seed=3, drop_last=False)
    assert parallel.persistent_workers
    assert same(first, batches(parallel, epoch=1))
    assert same(batches(serial, epoch=2), batches(parallel, epoch=2))


def test_workers_are_not_forked_from_a_process_with_threads(dataset):
    """Workers start from a clean server process, not by forking this one: a fork copies
    locks that other threads (MLflow's logging, the tracking spool, a test runner's) hold at
    that moment, and a worker that needs one waits forever (a CI run hung so, its two
    workers asleep on a futex)."""
    parallel = build_loader(dataset, 2, shuffle=True, num_workers=1, seed=3, drop_last=False)
    assert parallel.multiprocessing_context.get_start_method() == "forkserver"
    serial = build_loader(dataset, 2, shuffle=True, num_workers=0, seed=3, drop_last=False)
    assert serial.multiprocessing_context is None


def test_epoch_and_seed_change_order_and_augmentation(dataset):
    loader = build_loader(dataset, 4, shuffle=True, num_workers=0, seed=0, drop_last=False)
    epoch0, epoch1 = batches(loader, 0), batches(loader, 1)
    assert sorted(epoch0[0][0]) == sorted(dataset.samples[i][0] for i in range(4))
    assert not same(epoch0, epoch1)
    other_seed = build_loader(dataset, 4, shuffle=True, num_workers=0, seed=1, drop_last=False)
    assert not same(epoch0, batches(other_seed, 0))


def test_sampler_order_and_drop_last(dataset):
    sampler = EpochSampler(range(10), shuffle=False, seed=0)
    sampler.set_epoch(4)
    assert list(sampler) == [SampleKey(i, 0, 4) for i in range(10)]
    shuffled = EpochSampler(range(10), shuffle=True, seed=0)
    assert sorted(k.index for k in shuffled) == list(range(10))
    loader = build_loader(dataset, 3, shuffle=False, num_workers=0, seed=0, drop_last=True)
    assert [len(b["name"]) for b in loader] == [3]


def test_distributed_sampler_shares_keys(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        sampler = EpochSampler(range(7), shuffle=True, seed=2, distributed=True)
        sampler.set_epoch(3)
        keys = list(sampler)
        assert sorted(k.index for k in keys) == list(range(7)) and len(sampler) == 7
        assert {(k.seed, k.epoch) for k in keys} == {(2, 3)}
        sampler.set_epoch(4)
        assert [k.index for k in sampler] != [k.index for k in keys]
    finally:
        dist.destroy_process_group()


def test_process_shares_make_up_the_global_batches_of_one_process(monkeypatch):
    """Rank r takes every W-th key: its batch i and the other ranks' make up exactly batch i of
    one process; evaluation (no drop) counts every sample once, training drops the tail."""
    single = [k.index for k in EpochSampler(range(11), shuffle=True, seed=1)]
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        train = EpochSampler(range(11), shuffle=True, seed=1, distributed=True, drop_last=True)
        evaluation = EpochSampler(range(11), shuffle=False, seed=1, distributed=True)
        shares[rank] = [k.index for k in train]
        assert len(train) == len(shares[rank]) == 5
        assert [k.index for k in evaluation] == list(range(rank, 11, 2))
        assert len(evaluation) == (6 if rank == 0 else 5)
    per_rank = 2  # a global batch of 4
    for i in range(2):
        both = (
            shares[0][i * per_rank : (i + 1) * per_rank]
            + shares[1][i * per_rank : (i + 1) * per_rank]
        )
        assert sorted(both) == sorted(single[i * 4 : (i + 1) * 4])
