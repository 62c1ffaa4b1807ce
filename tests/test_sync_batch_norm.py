"""Batch norm over the global batch on CPU (gloo): 2 processes with half a batch each compute
the output, the gradients and the running statistics of 1 process with the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d
from torch import nn

from cts.engine import sync_batch_norm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return sync_batch_norm(
        nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    )


def _batch() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1


def _step(net: nn.Module, x: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    out = net(x)
    # A fixed random weighting of the outputs: a sum of squares would have gradients that
    # cancel to rounding noise (normalised outputs), which no tolerance could compare.
    weights = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(2))
    ((out * weights).sum() * scale).backward()
    result = {f"grad.{k}": p.grad for k, p in net.named_parameters()}
    result.update({f"state.{k}": v for k, v in net.state_dict().items()})
    result["out"] = out.detach()
    return result


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = nn.parallel.DistributedDataParallel(_net())
        # DDP averages over 2 processes: x2 gives the gradient of the summed loss.
        result = _step(net, _batch()[2 * rank : 2 * rank + 2], 2.0)
        result = {k.replace("module.", ""): v for k, v in result.items()}
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_normalise_by_the_global_batch(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    one = _step(_net(), _batch(), 1.0)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.testing.assert_close(torch.cat([ranks[0]["out"], ranks[1]["out"]]), one["out"])
    for key, value in one.items():
        if key == "out":
            continue
        # Float summation order differs: tolerances relative to the largest value (the
        # biases before a norm have a gradient of 0 up to rounding).
        atol = 1e-5 * max(value.abs().max().item(), 1.0)
        for rank in ranks:
            torch.testing.assert_close(rank[key], value, rtol=1e-4, atol=atol, msg=key)
