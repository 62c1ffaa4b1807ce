"""Preemption: SIGTERM or SIGUSR1 (a scheduler's warning before the time limit) ends a
training after the step in progress, with a resume checkpoint of that step, whatever
`checkpoint_every` says; every process stops after the same step; the resumed run equals an
uninterrupted one bit for bit (1 and 2 processes, CPU with gloo). A retried Kubeflow
Pipelines training task resumes too. And the rendezvous of a one-machine run listens on
loopback only."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from cts.data.loader import SampleKey, build_loader
from cts.engine import (
    DistributedContext,
    TrainLoop,
    TrainState,
    batches_from,
    poly_schedule,
    resume,
    seed_everything,
    split_batch,
)
from cts.processes import STOP_SIGNALS, stop_exit_code, stop_once

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# --- the loop itself, in spawned processes -------------------------------------------------

ITERATIONS = 7
ACCUM = 2
GLOBAL_BATCH = 4
CHECKPOINT_EVERY = 3
SIGNAL_AT = 9  # loss evaluation 9: the first micro-batch of step 5 (2 per step)


class Points(torch.utils.data.Dataset):
    """Ten random points and their label (sum > 0)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key: SampleKey) -> dict:
        generator = torch.Generator().manual_seed(key.index)
        x = torch.randn(4, generator=generator)
        return {"x": x, "y": (x.sum() > 0).long()}


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="sum")


def _count(batch: dict) -> torch.Tensor:
    return torch.tensor(len(batch["y"]))


def _train(rank: int, world: int, folder: Path, signal_to: int | None, signum: int) -> None:
    """Train (or resume) to ITERATIONS; with ``signal_to``, that rank sends itself ``signum``
    in the middle of step 5, as a scheduler would."""
    context = DistributedContext(rank, world)
    seed_everything(rank)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(ITERATIONS, warmup=2))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    micro = split_batch(GLOBAL_BATCH, world, ACCUM)
    loader = build_loader(Points(), micro, True, 0, seed=0, drop_last=True, distributed=world > 1)
    path = folder / "last.pt"
    state = resume(path, net, optimizer, scheduler, "f") or TrainState()
    calls = {"n": 0}

    def loss_fn(module: nn.Module, batch: dict) -> torch.Tensor:
        calls["n"] += 1
        if rank == signal_to and calls["n"] == SIGNAL_AT:
            os.kill(os.getpid(), signum)
        return _loss(module, batch)

    loop = TrainLoop(
        model=net,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        count_fn=_count,
        iterations=ITERATIONS,
        device=torch.device("cpu"),
        grad_accum_steps=ACCUM,
        checkpoint_path=path,
        checkpoint_every=CHECKPOINT_EVERY,
        fingerprint="f",
        log_every=1,
        context=context,
    )
    loop.run(state, batches_from(loader, state.iteration, ACCUM))
    if rank == 0:
        torch.save(model.state_dict(), folder / "final.pt")


def _phase(rank: int, world: int, folder: Path, signal_to: int | None, signum: int) -> int:
    """One training with the stop handlers of a stage's worker (cts.launch): the exit status
    the worker would have (0, or 143 after a stop)."""
    folder.mkdir(exist_ok=True)
    for each in STOP_SIGNALS:
        signal.signal(each, stop_once)
    try:
        _train(rank, world, folder, signal_to, signum)
    except KeyboardInterrupt as error:
        return stop_exit_code(error)
    return 0


def _worker(rank: int, world: int, port: int, root: str, signal_to, signum: int) -> None:
    """An uninterrupted training in ``root/full``; in ``root/cut`` one stopped by the signal,
    then resumed. Writes ``root/rank<N>.yaml``: the exit statuses, and after the stop the
    iteration of the resume checkpoint and whether the final weights were written."""
    root = Path(root)
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        codes = [_phase(rank, world, root / "full", None, 0)]
        codes.append(_phase(rank, world, root / "cut", signal_to, signum))
        if world > 1:
            dist.barrier()  # rank 0 alone writes the checkpoint
        checkpoint = torch.load(root / "cut" / "last.pt", weights_only=True)
        stopped = {"at": checkpoint["iteration"], "final": (root / "cut" / "final.pt").exists()}
        codes.append(_phase(rank, world, root / "cut", None, 0))
        (root / f"rank{rank}.yaml").write_text(yaml.safe_dump({"codes": codes, **stopped}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(world: int, root: Path, signal_to: int, signum: int) -> list[dict]:
    """:func:`_worker` in ``world`` processes (one: in this one, a quicker start); what each
    wrote."""
    args = (world, _free_port(), str(root), signal_to, signum)
    if world == 1:
        handlers = {each: signal.getsignal(each) for each in STOP_SIGNALS}
        try:
            _worker(0, *args)
        finally:
            for each, handler in handlers.items():
                signal.signal(each, handler)
    else:
        mp.start_processes(_worker, args=args, nprocs=world, join=True)
    return [yaml.safe_load((root / f"rank{rank}.yaml").read_text()) for rank in range(world)]


@pytest.mark.parametrize(
    ("world", "signal_to", "signum"),
    [(1, 0, signal.SIGTERM), (2, 1, signal.SIGUSR1)],
    ids=["1-SIGTERM", "2-SIGUSR1-rank1-only"],
)
def test_a_stop_signal_keeps_the_step_in_progress_and_the_resume_is_bit_identical(
    tmp_path, world, signal_to, signum
):
    """The signal arrives in step 5 (checkpoint_every 3): the loop finishes step 5, writes the
    resume checkpoint of step 5 and ends with 143; with 2 processes only rank 1 is signalled
    and both stop after step 5. The resumed run ends with the weights of an uninterrupted one."""
    results = _run(world, tmp_path, signal_to, signum)
    assert results == [{"codes": [0, 128 + signal.SIGTERM, 0], "at": 5, "final": False}] * world
    reference = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)
    assert [key for key, value in reference.items() if not torch.equal(resumed[key], value)] == []


# --- `cts train_segmenter` -----------------------------------------------------------------

STAGE_ITERATIONS = 30
STAGE_CHECKPOINT_EVERY = 5
# A tiny train_segmenter: 4 images, global batch 4, the oracle policy (no policy training),
# fp32 and no random masks.
TINY = {
    "device": "cpu",
    "depth": 1,
    "crop_size": 128,
    "num_tokens_shared": 4,
    "policy": "oracle",
    "drop_path_rate": 0.0,
    "train_precision": "fp32",
    "loss_stride": 1,
    "class_weight_power": 0.0,
    "iterations": STAGE_ITERATIONS,
    "batch_size": 4,
    "warmup_iterations": 1,
    "eval_every": 0,
    "checkpoint_every": STAGE_CHECKPOINT_EVERY,
    "num_workers": 0,
    "mlflow_registered_model": None,
}
_PLACEMENT_VARIABLES = re.compile(
    r"^(SLURM_\w+|PET_\w+|MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|"
    r"LOCAL_WORLD_SIZE|GROUP_RANK|TORCHELASTIC_\w+|GLOO_SOCKET_IFNAME|CTS_RESUME_DIR)$"
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not _PLACEMENT_VARIABLES.match(k)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    return env


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_synthetic):
    """A factory of job folders with the tiny run's params file; one MLflow store for all."""
    store = tmp_path_factory.mktemp("mlflow") / "mlruns.db"

    def make(name: str, data_root: str = str(tiny_synthetic)) -> Path:
        folder = tmp_path_factory.mktemp(name)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params.update(TINY, data_root=data_root, mlflow_tracking_uri=f"sqlite:///{store}")
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return folder

    return make


def _start(folder: Path, *args: str) -> subprocess.Popen:
    """`cts train_segmenter` in a session of its own: its process group is the whole job."""
    return subprocess.Popen(
        [str(BIN / "cts"), "train_segmenter", *args],
        cwd=folder,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _trained(path: Path) -> dict:
    """A segmenter checkpoint: its weights (``model``) and training history."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _same_training(final: dict, expected: dict) -> None:
    """Bit for bit the same weights, and the same loss and lr rows."""
    model = expected["model"]
    assert [
        key for key, value in model.items() if not torch.equal(final["model"][key], value)
    ] == []
    assert final["history"] == expected["history"]


def _listening() -> dict[str, str]:
    """Socket inode -> ``address:port`` (hex, as the kernel writes it) of every TCP socket
    that listens on this machine (/proc/net/tcp and tcp6)."""
    found = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                found[fields[9]] = fields[1]
    return found


def _sockets(pid: int) -> set[str]:
    inodes = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in descriptors:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def _run_watching_listeners(process: subprocess.Popen) -> tuple[str, str, set[str]]:
    """Wait for ``process``; returns its output and the local addresses its job's processes
    listened on meanwhile."""
    addresses = set()
    while process.poll() is None:
        listening = _listening()
        for pid in _group(process.pid):
            addresses |= {listening[i] for i in _sockets(pid) if i in listening}
        time.sleep(0.1)
    out, err = process.communicate()
    return out, err, addresses


@pytest.fixture(scope="module")
def reference(job):
    """Uninterrupted runs, per process count: the final weights, and for 2 processes the
    addresses their rendezvous and process group listened on."""
    runs = {}
    for world in (1, 2):
        folder = job(f"reference{world}")
        process = _start(folder, "--no-resume", "--set", f"nproc_per_node={world}")
        out, err, addresses = _run_watching_listeners(process)
        assert process.returncode == 0, (out + err)[-3000:]
        runs[world] = (_trained(folder / "checkpoints" / "segmenter.pt"), addresses)
    return runs


def _wait_for(path_glob, process: subprocess.Popen, what: str, seconds: float = 300) -> Path:
    deadline = time.monotonic() + seconds
    while not (found := path_glob()) and process.poll() is None:
        assert time.monotonic() < deadline, f"no {what} written"
        time.sleep(0.05)
    assert found, f"no {what} written: {process.communicate()}"
    return found[0]


def test_a_stopped_training_stage_keeps_its_last_step_and_resumes_bit_identical(job, reference):
    """2 processes; the signal comes after the periodic checkpoint of step 5: the stage ends
    with 143 and one line, its resume checkpoint holds a later step (nothing finished is
    lost), and the rerun resumes there and ends with the weights and history of an
    uninterrupted run, bit for bit. SIGUSR1 to every process of the job is what SLURM's
    ``--signal=USR1@N`` (without ``B:``) sends. (One process and SIGTERM: the Kubeflow test.)"""
    world = 2
    folder = job(f"stopped{world}")
    args = ["--set", f"nproc_per_node={world}"]
    stage = _start(folder, *args)
    resume_dir = folder / "checkpoints" / "resume"
    _wait_for(lambda: list(resume_dir.glob("segmenter-*.pt")), stage, "periodic checkpoint")
    os.killpg(stage.pid, signal.SIGUSR1)
    _, err = stage.communicate(timeout=300)
    assert stage.returncode == 128 + signal.SIGTERM, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: train_segmenter terminated (SIGTERM); run it again to resume"]
    (checkpoint,) = resume_dir.glob("segmenter-*.pt")
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["iteration"]
    assert STAGE_CHECKPOINT_EVERY < stopped_at < STAGE_ITERATIONS

    rerun = _start(folder, *args)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, (out + err)[-3000:]
    assert f"resuming segmenter training at iteration {stopped_at}" in out
    _same_training(_trained(folder / "checkpoints" / "segmenter.pt"), reference[world][0])


def test_a_one_machine_run_listens_on_loopback_only(reference):
    """The rendezvous store of the launcher and gloo's connections between the workers are
    unauthenticated: on one machine nothing may listen beyond 127.0.0.1."""
    _, addresses = reference[2]
    assert addresses  # the store, and each worker's gloo listener
    loopback = "0100007F"  # 127.0.0.1 in /proc/net/tcp's byte order
    assert {address.split(":")[0] for address in addresses} == {loopback}, addresses


# --- a Kubeflow Pipelines task -------------------------------------------------------------

_KFP_DRIVER = """
import sys
from pathlib import Path
from types import SimpleNamespace
from cts_stages.kfp_task import run_task

root = Path(sys.argv[1])
output = root / "outputs" / "train_segmenter" / "checkpoints_segmenter_pt"
params = {key: value for key, value in (line.split("=", 1) for line in sys.argv[2:])}
run_task(
    ["cts", "train_segmenter"],
    params=params,
    inputs={"${data_root}": SimpleNamespace(path=str(root / "inputs" / "data"))},
    outputs={"checkpoints/segmenter.pt": SimpleNamespace(path=str(output))},
    metrics={},
)
"""


def _yaml_text(value) -> str:
    """A pipeline parameter's text, as `--set key=value` takes it: 12, null, [0.5, 1.0]."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def test_a_retried_kubeflow_training_task_resumes_where_it_stopped(
    job, reference, tiny_synthetic, tmp_path
):
    """Kubernetes stops a pod with SIGTERM to its first process: the task passes it on to the
    stage, whose resume checkpoint is kept beside the task's output artifact, where the retry
    of the task (a new work folder) finds it and resumes."""
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "data").symlink_to(tiny_synthetic)
    params = yaml.safe_load((job("kfp") / "params.yaml").read_text())
    params["data_root"] = "data/tiny"
    texts = [f"{key}={_yaml_text(value)}" for key, value in params.items()]
    command = [sys.executable, "-c", _KFP_DRIVER, str(tmp_path), *texts]
    env = {**_env(), "PYTHONPATH": str(REPO)}

    def task() -> subprocess.Popen:
        return subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    first = task()
    resume_dir = tmp_path / "outputs" / "train_segmenter" / ".cts-resume"
    try:
        _wait_for(lambda: list(resume_dir.glob("segmenter-*.pt")), first, "periodic checkpoint")
        first.send_signal(signal.SIGTERM)  # the pod's first process only
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode != 0
    assert "failed with exit status 143" in err, err[-3000:]
    (checkpoint,) = resume_dir.glob("segmenter-*.pt")
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["iteration"]
    assert STAGE_CHECKPOINT_EVERY < stopped_at < STAGE_ITERATIONS

    retry = task()
    out, err = retry.communicate(timeout=300)
    assert retry.returncode == 0, (out + err)[-3000:]
    assert f"resuming segmenter training at iteration {stopped_at}" in out
    final = _trained(tmp_path / "outputs" / "train_segmenter" / "checkpoints_segmenter_pt")
    _same_training(final, reference[1][0])
    assert not list(resume_dir.glob("*.pt"))  # a finished training leaves no resume state
