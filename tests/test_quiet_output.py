"""What a stage and its workers print on stderr is theirs: no library deprecation warning from
every DDP worker, no MLflow progress bar when the trained model is logged."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cts.engine import sync_batch_norm

REPO = Path(__file__).resolve().parents[1]


def _worker(rank: int, port: int) -> None:
    """One DDP training step of a net with batch norm over the global batch (gloo)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = nn.parallel.DistributedDataParallel(
            sync_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        )
        net(torch.randn(2, 3, 6, 6)).square().sum().backward()
    finally:
        dist.destroy_process_group()


def test_distributed_workers_print_no_future_warning(capfd):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=2, join=True)
    assert "Warning" not in capfd.readouterr().err


# The stage process, its work replaced by what train_segmenter ends with: logging a (tiny)
# segmenter as an MLflow model, which copies its checkpoint through MLflow's artifact download.
STAGE = """
import sys
from pathlib import Path

import mlflow
import torch

import cts_stages.launch
from cts.checkpoint import save_checkpoint, segmenter_payload
from cts.cli import main
from cts.models import build_segmenter
from cts.tracking import log_model


def run_stage(stage, params, **kwargs):
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384", num_classes=5, crop_size=64, depth=1,
        policy="policy_net", num_tokens_shared=2, drop_path_rate=0.0,
    )
    checkpoint = save_checkpoint(Path("segmenter.pt"), segmenter_payload(model))
    mlflow.set_tracking_uri(f"sqlite:///{Path('mlruns.db').resolve()}")
    with mlflow.start_run(experiment_id=mlflow.create_experiment("quiet")):
        log_model(checkpoint, None)
    print("logged")


cts_stages.launch.run_stage = run_stage
sys.argv = ["cts", "train_segmenter", "--params", sys.argv[1]]
main()
"""


def test_a_stage_that_logs_its_model_prints_no_download_progress_bar(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(STAGE), str(REPO / "params.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "logged", result.stderr[-3000:]
    assert "Downloading artifacts" not in result.stderr, result.stderr[-3000:]
