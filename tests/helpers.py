"""Plain helpers shared by test modules (fixtures live in conftest.py): the repository and its
tools, the micro pipeline's settings, processes and stores, the engine's toy training, and
the two simulated nodes on loopback. Test modules import this, never each other."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml
from torch import nn

if TYPE_CHECKING:
    from cts.data.loader import SampleKey

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Import name -> its folder in the repository (pyproject.toml's package-dir): the pipeline
# layer keeps the top-level stages/ folder and installs as `cts_stages`.
PACKAGE_FOLDERS = {"cts": "cts", "cts_stages": "stages"}
needs_dvc = pytest.mark.skipif(shutil.which("dvc", path=str(BIN)) is None, reason="needs dvc")


def module_path(name: str, root: Path = REPO) -> Path:
    """``cts_stages.launch`` -> ``root/stages/launch`` (no suffix: a module or a package)."""
    top, *rest = name.split(".")
    return root.joinpath(PACKAGE_FOLDERS[top], *rest)


def module_name(path: Path, root: Path = REPO) -> str:
    """``stages/launch.py`` -> ``cts_stages.launch``; a package's ``__init__.py`` -> the
    package."""
    folder, *parts = path.relative_to(root).with_suffix("").parts
    top = {f: name for name, f in PACKAGE_FOLDERS.items()}[folder]
    return ".".join([top, *(parts[:-1] if parts and parts[-1] == "__init__" else parts)])


# --- the micro pipeline --------------------------------------------------------------------

# `dvc repro` of these in a copy of the repository: every stage in seconds. 8 + 3 images: the
# two-process runs of test_distributed start from the same data (3: an odd split, 2 and 1).
MICRO = {
    "synthetic_num_train": 8,
    "synthetic_num_val": 3,
    "synthetic_image_size": 128,
    "crop_size": 128,
    "num_tokens_shared": 4,
    "depth": 1,
    "policy_iterations": 3,
    "policy_batch_size": 2,
    "iterations": 4,
    "batch_size": 2,
    "eval_every": 2,
    "checkpoint_every": 2,
    "warmup_iterations": 1,
    "ms_scales": [1.0, 1.25],
    "bench_batch_size": 1,
    "bench_repeats": 1,
    "sweep_tokens_shared": [2, 0],
    "sweep_share_thresholds": [0.5],
    "sweep_tome_r": [8],
    "device": "cpu",
}
# Seconds a whole pipeline (`dvc repro`, the KFP local run) may take before it counts as hung:
# minutes alone on 2 cores, many more beside other jobs.
PIPELINE_TIMEOUT = 1800
# What `dvc repro` copies of the repository: the code and the pipeline, nothing built.
PIPELINE_FILES = ("cts", "stages", ".dvc", "dvc.yaml", "params.yaml", ".gitignore")


@dataclass(frozen=True)
class Pipeline:
    """A repository after `dvc repro`: its folder, the environment its commands run in, its
    MLflow sqlite store (outside the folder) and what `dvc repro` printed."""

    repo: Path
    env: dict[str, str]
    store: Path
    output: str


def run(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> str:
    """``args`` in ``cwd``; fails the test with the end of its output unless it succeeds.
    Returns stdout + stderr."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def set_params(repo: Path, **values) -> None:
    """Sets ``values`` in ``repo``'s params.yaml, keeping the order of its keys."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params.update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def pipeline_env(**extra: str) -> dict[str, str]:
    """This environment with the venv's tools first, a git identity, no MLflow URI (the
    params file names the store) and ``extra``."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        **extra,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def build_pipeline(repo: Path, params: dict, env: dict[str, str]) -> Pipeline:
    """A copy of this repository in ``repo`` (a new folder) on ``params``, committed to a
    git repository of its own, after `dvc repro`; its store beside the folder."""
    repo.mkdir()
    for name in PIPELINE_FILES:
        source = REPO / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "tmp", "cache")
            shutil.copytree(source, repo / name, ignore=ignore)
        else:
            shutil.copy(source, repo / name)
    store = repo.parent / "mlruns.db"
    set_params(repo, **params, mlflow_tracking_uri=f"sqlite:///{store}")
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "micro"], repo, env)
    return Pipeline(repo, env, store, run(["dvc", "repro"], repo, env, timeout=PIPELINE_TIMEOUT))


def copy_pipeline(pipeline: Pipeline, folder: Path, **env: str) -> Pipeline:
    """A copy of ``pipeline``'s repository (its git and DVC cache included) in
    ``folder``/repo, with a copy of its store in ``folder``: what a test changes there
    leaves the original and the other tests alone. ``env``: added to its environment."""
    repo = folder / "repo"
    shutil.copytree(
        pipeline.repo, repo, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    store = folder / "mlruns.db"
    shutil.copy(pipeline.store, store)
    # Not a param of any stage (a runtime setting): `dvc status` stays clean.
    set_params(repo, mlflow_tracking_uri=f"sqlite:///{store}")
    return Pipeline(repo, {**pipeline.env, **env}, store, pipeline.output)


def stages_run(output: str) -> set[str]:
    """The stages a `dvc repro` ran, from what it printed."""
    return set(re.findall(r"Running stage '(\w+)'", output))


def runs(store: str, experiment: str) -> tuple[list, list]:
    """(parents, children) of an MLflow experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in found if "mlflow.parentRunId" in r.data.tags]


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the time of the call."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the engine's toy training -------------------------------------------------------------


class Points(torch.utils.data.Dataset):
    """12 points of R^4 (each drawn from its index), labelled by the sign of their sum."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, key: SampleKey) -> dict:
        generator = torch.Generator().manual_seed(key.index)
        x = torch.randn(4, generator=generator)
        return {"x": x, "y": (x.sum() > 0).long()}


def points_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The summed cross-entropy of a batch of :class:`Points` (the loop divides by the count)."""
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="sum")


def points_count(batch: dict) -> torch.Tensor:
    return torch.tensor(len(batch["y"]))


def points_loop(folder: Path, iterations: int = 6, fail_at: int | None = None, accum: int = 1):
    """A TrainLoop of a small MLP on :class:`Points` (global batch 4 in ``accum`` micro-batches,
    a checkpoint in ``folder`` every 2 iterations), resumed from that checkpoint if there is
    one; with ``fail_at``, that loss evaluation raises KeyboardInterrupt.

    Returns (loop, state, loader, model).
    """
    from cts.data.loader import build_loader
    from cts.engine import TrainLoop, TrainState, poly_schedule, resume, seed_everything

    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(iterations, warmup=2))
    loader = build_loader(Points(), 4 // accum, True, 0, seed=0, drop_last=True)
    calls = {"n": 0}

    def loss_fn(net, batch):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt
        return points_loss(net, batch)

    loop = TrainLoop(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        count_fn=points_count,
        iterations=iterations,
        device=torch.device("cpu"),
        grad_accum_steps=accum,
        checkpoint_path=folder / "last.pt",
        checkpoint_every=2,
        fingerprint="f",
        log_every=1,
    )
    state = resume(folder / "last.pt", model, optimizer, scheduler, "f") or TrainState()
    return loop, state, loader, model


# --- two simulated nodes on loopback -------------------------------------------------------

LOOPBACK_ITERATIONS = 20
# A tiny train_segmenter: 4 images, global batch 4 (2 per process), the oracle policy (no
# policy training needed), fp32 and no random masks, so that runs agree to rounding.
LOOPBACK_PARAMS = {
    "device": "cpu",
    "depth": 1,
    "crop_size": 128,
    "num_tokens_shared": 4,
    "policy": "oracle",
    "drop_path_rate": 0.0,
    "train_precision": "fp32",
    "loss_stride": 1,
    "class_weight_power": 0.0,
    "iterations": LOOPBACK_ITERATIONS,
    "batch_size": 4,
    "warmup_iterations": 1,
    "eval_every": 0,  # the oracle policy needs labels, which validation does not pass
    "checkpoint_every": 0,
    "rendezvous_timeout": 120,
}
# What a scheduler or launcher may have left in this test's own environment.
PLACEMENT_VARIABLES = re.compile(
    r"^(SLURM_\w+|PET_\w+|MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|"
    r"LOCAL_WORLD_SIZE|GROUP_RANK|TORCHELASTIC_\w+)$"
)


def base_env() -> dict[str, str]:
    """This environment without placement variables or MLflow URI, the venv's tools first."""
    env = {k: v for k, v in os.environ.items() if not PLACEMENT_VARIABLES.match(k)}
    env.pop("MLFLOW_TRACKING_URI", None)
    # One thread per process on a small machine; the runs compared use the same kernels.
    env.update(OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    return env


def start_training(folder: Path, env: dict, *args: str) -> subprocess.Popen:
    """`cts train_segmenter` in ``folder`` (its params.yaml) with ``env``."""
    return subprocess.Popen(
        [str(BIN / "cts"), "train_segmenter", *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, once all have ended."""
    outputs = [p.communicate(timeout=300) for p in processes]
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs, strict=True)]


def train_nodes(folder: Path, envs: list[dict], *args: str) -> list[tuple[int, str, str]]:
    """``cts train_segmenter`` once per node environment (node 1 first: it waits)."""
    processes = [start_training(folder, {**base_env(), **env}, *args) for env in reversed(envs)]
    return finish(processes)[::-1]


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "checkpoints" / "segmenter.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def worst_difference(one: dict, two: dict) -> float:
    """The largest absolute difference between two state dicts of the same keys."""
    assert one.keys() == two.keys()
    return max((one[k].double() - two[k].double()).abs().max().item() for k in one)


def trained_by_rank_0_of_two(results: list[tuple[int, str, str]]) -> None:
    """Both nodes ended well and only node 0 wrote the result: they trained as one job (alone,
    each would have trained the same weights and reported them)."""
    for code, out, err in results:
        assert code == 0, (out + err)[-3000:]
    (_, first, _), (_, second, _) = results
    assert "segmenter: final loss" in first and "final loss" not in second
