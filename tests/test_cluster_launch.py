"""A stage under a cluster scheduler: the environment SLURM's ``srun`` and Kubeflow's training
jobs give each process, read into the launch settings (explicit params win; contradictions
are one line), and two simulated nodes on loopback that train like two processes on one
machine (CPU, gloo): SLURM with a compressed host list, a 2-replica PyTorchJob, and a SLURM
job preempted with SIGTERM and requeued."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import (
    LOOPBACK_ITERATIONS,
    PLACEMENT_VARIABLES,
    REPO,
    base_env,
    finish,
    free_port,
    start_training,
    train_nodes,
    trained_by_rank_0_of_two,
    trained_weights,
    worst_difference,
)

from cts.cluster import (
    Placement,
    Tasks,
    expand_hostlist,
    kubeflow_placement,
    scheduler_placement,
    slurm_hostnames,
    slurm_placement,
)
from cts_stages.launch import first_process, launch_plan
from cts_stages.params import ParamError, load_params

MANIFESTS = REPO / "cluster" / "kubeflow"
SBATCH = REPO / "cluster" / "slurm" / "ade20k_vit_s.sbatch"
DOCKERFILE = REPO / "cluster" / "Dockerfile"


def _slurm_step(node: int, nodes: int = 2, tasks_per_node: int = 1, local: int = 0) -> dict:
    """The variables srun sets in a task of a job step over ``node[01-..]`` (SLURM 23)."""
    hosts = f"node[01-{nodes:02d}]"
    tasks = nodes * tasks_per_node
    spread = f"{tasks_per_node}(x{nodes})"
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOBID": "4242",
        "SLURM_JOB_NAME": "cts",
        "SLURM_JOB_NODELIST": hosts,
        "SLURM_NODELIST": hosts,
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(tasks),
        "SLURM_NPROCS": str(tasks),
        "SLURM_TASKS_PER_NODE": spread,
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_STEP_NODELIST": hosts,
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_TASKS_PER_NODE": spread,
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node * tasks_per_node + local),
        "SLURM_LOCALID": str(local),
        "SLURMD_NODENAME": f"node{node + 1:02d}",
    }


def _pytorchjob_pod(rank: int, replicas: int = 2, port: int = 23456, pet: bool = True) -> dict:
    """A PyTorchJob pod's variables from the Training Operator (v1.7+ with ``pet``: it adds
    torchrun's PET_*, nprocPerNode defaulting to auto; earlier: the first four only)."""
    env = {
        "MASTER_ADDR": "cts-train-master-0",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(replicas),
        "RANK": str(rank),
        "PYTHONUNBUFFERED": "1",
    }
    if pet:
        env.update(
            PET_MASTER_ADDR="cts-train-master-0",
            PET_MASTER_PORT=str(port),
            PET_NODE_RANK=str(rank),
            PET_NNODES=str(replicas),
            PET_NPROC_PER_NODE="auto",
        )
    return env


def _trainjob_pod(rank: int, nodes: int = 2, nproc: str = "auto") -> dict:
    """A Trainer v2 TrainJob pod (torch runtime): torchrun's PET_* variables only."""
    return {
        "PET_NNODES": str(nodes),
        "PET_NPROC_PER_NODE": nproc,
        "PET_NODE_RANK": str(rank),
        "PET_MASTER_ADDR": "cts-train-trainer-node-0-0.cts-train",
        "PET_MASTER_PORT": "29500",
    }


@pytest.fixture
def known_nodes(monkeypatch):
    """node01, node02, ... resolve (to 127.0.0.1), as a cluster's nodes do on its nodes."""
    resolve = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        return resolve("127.0.0.1" if re.fullmatch(r"node\d+", host) else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _params(*overrides: str) -> dict:
    return load_params(REPO / "params.yaml", ["device=cpu", *overrides])


# --- the host list -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-02]", ["node01", "node02"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),  # no padding: the low bound has none
        ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),
        ("a1,b[1-3]", ["a1", "b1", "b2", "b3"]),
        ("a[1-2]-ib,c", ["a1-ib", "a2-ib", "c"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # the first bracket slowest
        ("x[1,3],y[2-3]z", ["x1", "x3", "y2z", "y3z"]),
    ],
)
def test_host_lists_expand_as_scontrol_show_hostnames(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    ("hostlist", "problem"),
    [
        ("node[01-02", "unbalanced"),
        ("node01-02]", "unbalanced"),
        ("node[a-b]", "not a list of numbers"),
        ("node[3-1]", "runs backwards"),
        ("a,,b", "empty host name"),
        ("n[1-[2]]", "nested"),
    ],
)
def test_a_malformed_host_list_is_an_error(hostlist, problem):
    with pytest.raises(ValueError, match=problem):
        expand_hostlist(hostlist)


def test_scontrol_expands_the_host_list_where_installed(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "%s\\n" n7 n9\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm_hostnames("n[7,9]") == ["n7", "n9"]
    fake.write_text("#!/bin/sh\necho 'Invalid hostlist: x[' >&2\nexit 1\n")
    with pytest.raises(ValueError, match=r"scontrol show hostnames: Invalid hostlist: x\["):
        slurm_hostnames("x[")


# --- the schedulers' environments ----------------------------------------------------------


def test_a_slurm_step_with_one_task_per_node_places_its_node():
    placement = slurm_placement(_slurm_step(1))
    assert placement == Placement("SLURM", nnodes=2, node_rank=1, master_addr="node01")
    assert placement.origin["nnodes"] == "SLURM_STEP_NUM_NODES=2"


def test_a_slurm_step_with_one_task_per_gpu_places_the_task():
    env = _slurm_step(1, tasks_per_node=4, local=2)
    assert slurm_placement(env).tasks == Tasks(
        rank=6, world_size=8, local_rank=2, local_world_size=4
    )
    uneven = {**env, "SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "4,3"}
    assert slurm_placement(uneven).tasks == Tasks(6, 7, 2, 3)


def test_the_allocation_alone_is_not_a_step():
    """The batch script and an salloc shell have the job's variables, but the command runs
    on one node: nothing is read."""
    batch = {k: v for k, v in _slurm_step(0).items() if not k.startswith("SLURM_STEP")}
    assert slurm_placement(batch) is None
    assert scheduler_placement({}) is None


def test_the_step_variables_come_before_the_jobs():
    """A step on 2 of the job's 3 nodes: its own nodes, its first host hosts the rendezvous."""
    env = {
        **_slurm_step(0),
        "SLURM_JOB_NODELIST": "node[01-03]",
        "SLURM_NNODES": "3",
        "SLURM_STEP_NODELIST": "node[02-03]",
    }
    assert slurm_placement(env) == Placement("SLURM", 2, 0, "node02")
    older = {
        k: v for k, v in env.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES")
    }
    older["SLURM_NNODES"] = "3"
    assert slurm_placement(older) == Placement("SLURM", 3, 0, "node01")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_STEP_NODELIST": "node[01-03]"}, r"SLURM_STEP_NODELIST=node\[01-03\] names 3 host"),
        ({"SLURM_STEP_NODELIST": "node[01-"}, r"SLURM_STEP_NODELIST=node\[01-: not a host list"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is not below SLURM_STEP_NUM_NODES=2"),
        ({"SLURM_NODEID": "x"}, "SLURM_NODEID='x': expected a non-negative integer"),
    ],
)
def test_a_slurm_environment_that_cannot_be_read_is_one_line(change, message):
    with pytest.raises(ValueError, match=message):
        slurm_placement({**_slurm_step(1), **change})


def test_pytorchjob_pods_of_every_operator_version_and_trainjob_pods():
    newer = kubeflow_placement(_pytorchjob_pod(1))
    older = kubeflow_placement(_pytorchjob_pod(1, pet=False))
    assert newer == Placement("Kubeflow", 2, 1, "cts-train-master-0", 23456, "auto")
    assert older == Placement("Kubeflow", 2, 1, "cts-train-master-0", 23456, None)
    assert older.origin["nnodes"] == "WORLD_SIZE=2"
    trainjob = kubeflow_placement(_trainjob_pod(1, nproc="4"))
    assert trainjob == Placement("Kubeflow", 2, 1, "cts-train-trainer-node-0-0.cts-train", 29500, 4)
    with pytest.raises(ValueError, match="PET_NNODES=1:4: an elastic node range"):
        kubeflow_placement({**_pytorchjob_pod(0), "PET_NNODES": "1:4"})
    # A worker that torchrun started (ours in the pod): its environment places it.
    assert scheduler_placement({**_pytorchjob_pod(1), "LOCAL_RANK": "0"}) is None


# --- the params with the scheduler's environment -------------------------------------------


def test_auto_takes_the_schedulers_topology_and_one_process_per_node_is_the_worker(known_nodes):
    settings, worker = launch_plan(_params(), _slurm_step(1))
    assert (settings.nnodes, settings.node_rank, settings.master_addr) == (2, 1, "node01")
    assert settings.nproc_per_node == 1 and worker == Tasks(1, 2, 0, 1)
    settings, worker = launch_plan(_params("nproc_per_node=2"), _slurm_step(1))
    assert settings.world_size == 4 and worker is None  # it launches its node's 2 processes
    settings, worker = launch_plan(_params(), _slurm_step(1, tasks_per_node=2, local=1))
    assert worker == Tasks(3, 4, 1, 2)  # one task per GPU: each task is a worker
    settings, worker = launch_plan(_params(), _pytorchjob_pod(1))
    assert (settings.master_addr, settings.master_port, worker) == (
        "cts-train-master-0",
        23456,
        Tasks(1, 2, 0, 1),
    )
    settings, worker = launch_plan(_params("nproc_per_node=auto"), _trainjob_pod(0, nproc="2"))
    assert settings.world_size == 4 and worker is None
    # No scheduler: one machine, as before.
    settings, worker = launch_plan(_params(), {})
    assert (settings.nnodes, settings.node_rank, settings.master_addr, worker) == (
        1,
        0,
        "127.0.0.1",
        None,
    )


def test_explicit_params_win_where_they_can():
    params = _params("master_addr=10.0.0.7", "master_port=29999", "nnodes=2", "node_rank=1")
    settings, _ = launch_plan(params, _slurm_step(1))
    assert (settings.master_addr, settings.master_port, settings.nnodes) == ("10.0.0.7", 29999, 2)
    settings, _ = launch_plan(_params("master_addr=127.0.0.1"), _pytorchjob_pod(0))
    assert (settings.master_addr, settings.master_port) == ("127.0.0.1", 23456)


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        (
            ["nnodes=2"],
            _slurm_step(0, nodes=1),
            r"^nnodes=2: SLURM runs this process with nnodes 1 \(SLURM_STEP_NUM_NODES=1\): "
            r"set nnodes to auto or 1$",
        ),
        (
            ["node_rank=0"],
            _slurm_step(1),
            r"^node_rank=0: SLURM runs this process with node_rank 1 \(SLURM_NODEID=1\)",
        ),
        (
            ["nproc_per_node=4"],
            _slurm_step(0, tasks_per_node=4),
            r"^nproc_per_node=4: SLURM started 4 tasks on this node "
            r"\(SLURM_STEP_TASKS_PER_NODE=4\(x2\)\), each one process",
        ),
        (
            ["nproc_per_node=1"],
            _trainjob_pod(0, nproc="4"),
            r"^nproc_per_node=1: Kubeflow runs 4 per node \(PET_NPROC_PER_NODE=4\)",
        ),
        (
            ["nnodes=3"],
            _pytorchjob_pod(0, pet=False),
            r"^nnodes=3: Kubeflow runs this process with nnodes 2 \(WORLD_SIZE=2\)",
        ),
        (
            [],
            {**_slurm_step(0), "SLURM_STEP_NODELIST": "no-such-node[1-2].invalid"},
            r"^SLURM_STEP_NODELIST=no-such-node\[1-2\]\.invalid: unknown host "
            r"'no-such-node1\.invalid' \(.+\): set master_addr to node 0's address$",
        ),
    ],
)
def test_a_contradiction_or_an_unknown_host_is_one_line_before_any_work(overrides, env, message):
    with pytest.raises(ValueError, match=message) as error:
        launch_plan(_params(*overrides), env)
    assert "\n" not in str(error.value)


def test_only_the_first_process_of_the_job_cleans_up(monkeypatch, known_nodes):
    """Another node's live processes look dead from here: on a shared file system only the
    first cleans up after killed runs."""
    for key in [key for key in os.environ if PLACEMENT_VARIABLES.match(key)]:
        monkeypatch.delenv(key)
    for name, value in _slurm_step(1).items():
        monkeypatch.setenv(name, value)
    assert not first_process("train_segmenter", _params())
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert first_process("train_segmenter", _params())


def test_auto_and_explicit_node_params_are_checked():
    params = load_params(REPO / "params.yaml")
    assert (params["nnodes"], params["node_rank"], params["master_addr"]) == ("auto",) * 3
    with pytest.raises(ParamError, match=r"node_rank=2: allowed 0\.\.1 for nnodes=2"):
        load_params(REPO / "params.yaml", ["nnodes=2", "node_rank=2"])
    with pytest.raises(ParamError, match=r"nnodes=0: allowed: auto or an integer >= 1"):
        load_params(REPO / "params.yaml", ["nnodes=0"])
    with pytest.raises(ValueError, match=r"node_rank=1: allowed 0\.\.0 for nnodes=1"):
        launch_plan(_params("node_rank=1"), {})


# --- the files for the cluster -------------------------------------------------------------


def _sbatch_options() -> dict[str, str | None]:
    lines = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    return dict(re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?$", line).groups() for line in lines)


def test_the_sbatch_script_runs_one_task_per_node_and_is_requeueable():
    options = _sbatch_options()
    assert options["requeue"] is None and options["ntasks-per-node"] == "1"
    assert re.fullmatch(r"B:USR1@\d+", options["signal"])
    assert int(options["signal"].rpartition("@")[2]) >= 120  # time to stop and requeue


@pytest.fixture
def fake_slurm(tmp_path):
    """srun and scontrol that record their calls in a log; srun runs until SIGTERM, which
    it answers as the stage does (143)."""
    log = tmp_path / "calls.log"
    tools = tmp_path / "bin"
    tools.mkdir()
    # Its trap is set before it logs its call: the tests signal it once they read the call.
    (tools / "srun").write_text(
        "#!/bin/bash\n"
        'trap \'echo "srun: TERM" >> "$LOG"; kill $! 2>/dev/null; exit 143\' TERM\n'
        'echo $$ > "$LOG.pid"\necho "srun $*" >> "$LOG"\n'
        "sleep 120 &\nwait $!\n"
    )
    (tools / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$LOG"\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    env = {
        **base_env(),
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "LOG": str(log),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node[01-02]",
    }

    def submit() -> subprocess.Popen:
        script = subprocess.Popen(
            ["bash", str(SBATCH), "train_policy", "--set", "policy_iterations=5"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 20
        while not (log.is_file() and "srun" in log.read_text()):
            assert time.monotonic() < deadline and script.poll() is None, script.stdout.read()
            time.sleep(0.05)
        return script

    return submit, log


def test_near_the_time_limit_the_script_stops_the_step_and_requeues_the_job(fake_slurm):
    submit, log = fake_slurm
    script = submit()
    script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends
    output, _ = script.communicate(timeout=30)
    assert script.returncode == 143, output
    assert log.read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 .venv/bin/cts train_policy --params params.yaml "
        "--set nproc_per_node=auto --set policy_iterations=5",
        "srun: TERM",
        "scontrol requeue 77",
    ]
    assert "time limit near: stopping train_policy, requeueing job 77" in output


def test_on_preemption_the_script_waits_for_the_step_and_leaves_the_requeue_to_slurm(
    fake_slurm,
):
    submit, log = fake_slurm
    script = submit()
    # SLURM signals the batch script and the step's processes.
    script.send_signal(signal.SIGTERM)
    os.kill(int(Path(f"{log}.pid").read_text()), signal.SIGTERM)
    output, _ = script.communicate(timeout=30)
    assert script.returncode == 143, output
    assert "scontrol" not in log.read_text() and "srun: TERM" in log.read_text()


@pytest.mark.parametrize("name", ["pytorchjob.yaml", "trainjob.yaml"])
def test_the_kubeflow_manifests_run_a_stage_with_the_params_they_mount(name):
    from cts.cli import app
    from cts_stages.config import render

    text = (MANIFESTS / name).read_text()
    (job,) = yaml.safe_load_all(text)
    if job["kind"] == "PyTorchJob":
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
        pods = [spec["template"]["spec"] for spec in specs.values()]
        containers = [pod["containers"][0] for pod in pods]
        assert {c["name"] for c in containers} == {"pytorch"}  # the operator's container name
        volumes = [pod["volumes"] for pod in pods]
    else:
        assert job["kind"] == "TrainJob"
        assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
        (override,) = job["spec"]["podSpecOverrides"]
        containers = [{**job["spec"]["trainer"], **override["containers"][0]}]
        volumes = [override["volumes"]]
    (command,) = {tuple(c["command"]) for c in containers}
    stages = {c.name for c in app.registered_commands}
    assert command[0] == "cts" and command[1] in stages and command[2] == "--params"
    params_path = Path(command[3])
    workdir = re.findall(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.MULTILINE)[-1]
    for container, pod_volumes in zip(containers, volumes, strict=True):
        mounts = {Path(m["mountPath"]): m["name"] for m in container["volumeMounts"]}
        (volume,) = [v for v in pod_volumes if v["name"] == mounts[params_path.parent]]
        # The ConfigMap the manifest's instructions create holds the file under that name.
        configmap = volume["configMap"]["name"]
        assert f"kubectl create configmap {configmap} --from-file={params_path.name}" in text
        # Checkpoints, metrics and data are written relative to it: on the volume.
        workspace = [v for v in pod_volumes if "persistentVolumeClaim" in v]
        assert mounts[Path(container.get("workingDir", workdir))] == workspace[0]["name"]
    # The params file the instructions write leaves the topology to the job.
    assert f"cts config ade20k-vit-s --out {params_path.name}" in text
    _, params = render("ade20k-vit-s")
    assert params["nnodes"] == params["node_rank"] == params["master_addr"] == "auto"
    assert params["nproc_per_node"] == "auto" and params["master_port"] is None


# --- two nodes on loopback -----------------------------------------------------------------


@pytest.mark.e2e
def test_a_pytorchjob_with_two_replicas_on_loopback_trains_like_two_processes_on_one(
    loopback_job, loopback_reference
):
    """The master's and the worker's pod environments; each pod runs the stage as its one
    worker, the service name of the master mapped to 127.0.0.1 by the master_addr param."""
    folder = loopback_job("pytorchjob")
    port = free_port()
    pods = [_pytorchjob_pod(rank, port=port) for rank in (0, 1)]
    results = train_nodes(folder, pods, "--no-resume", "--set", "master_addr=127.0.0.1")
    trained_by_rank_0_of_two(results)
    assert worst_difference(trained_weights(folder), loopback_reference) < 1e-4


@pytest.mark.e2e
def test_two_slurm_nodes_on_loopback_preempted_and_requeued_train_like_two_processes_on_one(
    loopback_job, loopback_reference
):
    """``srun --nodes=2 --ntasks-per-node=1 cts train_segmenter`` over ``node[01-02]``, both
    nodes on this machine (node 0's name mapped to 127.0.0.1 by the master_addr param), the
    topology from SLURM's variables. SLURM's preemption (and the sbatch script at the time
    limit) sends SIGTERM to every task: each ends with 143 and one line, the checkpoint stays,
    and the requeued job resumes from it; its 20 iterations end with the weights of
    ``nproc_per_node: 2`` on one machine (a resumed run's are those of an uninterrupted one:
    test_resume_distributed)."""
    folder = loopback_job("slurm")
    args = ["--set", "master_addr=127.0.0.1", "--set", f"master_port={free_port()}"]
    args += ["--set", "checkpoint_every=1"]
    envs = [{**base_env(), **_slurm_step(node)} for node in (0, 1)]
    tasks = [start_training(folder, env, *args) for env in reversed(envs)][::-1]
    resume_dir = folder / "checkpoints" / "resume"
    deadline = time.monotonic() + 240
    while not list(resume_dir.glob("segmenter-*.pt")) and all(t.poll() is None for t in tasks):
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    for task in tasks:
        task.send_signal(signal.SIGTERM)
    for code, out, err in finish(tasks):
        assert code == 143, (out + err)[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == ["error: train_segmenter terminated (SIGTERM); run it again to resume"]
    assert list(resume_dir.glob("segmenter-*.pt"))

    requeued = [start_training(folder, env, *args) for env in reversed(envs)][::-1]
    results = finish(requeued)
    trained_by_rank_0_of_two(results)
    resumed = re.search(r"resuming segmenter training at iteration (\d+)", results[0][1])
    assert resumed and 1 <= int(resumed.group(1)) < LOOPBACK_ITERATIONS
    assert worst_difference(trained_weights(folder), loopback_reference) < 1e-4
