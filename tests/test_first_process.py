"""A stage that is not distributed (download, preprocess, benchmark, sweep) runs once per job:
on the job's first process; the others (SLURM's other nodes and tasks, a Kubeflow job's
other pods, torchrun's other ranks) skip it with one line and exit 0. The sbatch script's
`srun` over two nodes, with a stand-in `srun`, therefore runs `download` once. A distributed
stage that a batch script runs outside a job step says that it runs on one node only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cts_stages.launch import DISTRIBUTED_STAGES, first_process, run_stage
from cts_stages.params import load_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SBATCH = REPO / "cluster" / "slurm" / "ade20k_vit_s.sbatch"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
SINGLE_STAGES = [stage for stage in STAGES if stage not in DISTRIBUTED_STAGES]
_PLACEMENT_VARIABLES = re.compile(
    r"^(SLURM_\w+|PET_\w+|MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|"
    r"LOCAL_WORLD_SIZE|GROUP_RANK|TORCHELASTIC_\w+)$"
)


def _slurm_step(node: int) -> dict[str, str]:
    """What srun sets in the task of node ``node`` of a step over node[01-02], one task per
    node."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NODELIST": "node[01-02]",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
    }


OTHER_PROCESSES = {
    "slurm-node-1": (_slurm_step(1), "SLURM node 1 of 2"),
    "pytorchjob-worker": (
        {"MASTER_ADDR": "m", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"},
        "Kubeflow node 1 of 2",
    ),
    "torchrun-rank-1": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "rank 1"),
}


@pytest.fixture
def clean_env(monkeypatch):
    for key in [key for key in os.environ if _PLACEMENT_VARIABLES.match(key)]:
        monkeypatch.delenv(key)
    return monkeypatch


def test_the_stages_that_run_once_per_job():
    assert SINGLE_STAGES == ["download", "preprocess", "benchmark", "sweep"]


@pytest.mark.parametrize("stage", SINGLE_STAGES)
@pytest.mark.parametrize("name", OTHER_PROCESSES)
def test_a_stage_that_is_not_distributed_is_skipped_on_the_jobs_other_processes(
    clean_env, capsys, stage, name
):
    env, where = OTHER_PROCESSES[name]
    for key, value in env.items():
        clean_env.setenv(key, value)
    ran = []
    clean_env.setattr(f"cts_stages.{stage}.run", lambda params, **kwargs: ran.append(params))
    params = load_params(REPO / "params.yaml")
    assert not first_process(stage, params)
    run_stage(stage, params)
    assert ran == []
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{stage}: runs on the job's first process only; this is {where}")


@pytest.mark.parametrize(
    "env", [{}, _slurm_step(0), {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}]
)
def test_the_first_process_runs_it(clean_env, capsys, env):
    for key, value in env.items():
        clean_env.setenv(key, value)
    ran = []
    clean_env.setattr("cts_stages.benchmark.run", lambda params, **kwargs: ran.append(params))
    params = load_params(REPO / "params.yaml")
    assert first_process("benchmark", params)
    run_stage("benchmark", params)
    assert len(ran) == 1 and capsys.readouterr().out == ""


def test_a_distributed_stage_outside_a_job_step_says_it_runs_on_one_node(clean_env, capsys):
    """The batch script of a 2-node job without srun: the stage runs on this node only."""
    step = _slurm_step(0)
    for key in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        clean_env.setenv(key, step[key])
    ran = []
    clean_env.setattr("cts_stages.eval_ss.run", lambda params, **kwargs: ran.append(params))
    run_stage("eval_ss", load_params(REPO / "params.yaml", ["device=cpu"]))
    assert len(ran) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        "note: eval_ss runs on this node only: SLURM job 4242 has 2 nodes, but this is no "
        "job step (SLURM_STEP_ID is not set); start it with srun to use them all"
    )


# A stand-in srun for a step over 2 nodes with one task per node: the command once per node,
# at the same time, with the variables srun sets; each task's output in task<node>.log.
_SRUN = """#!/bin/bash
echo "srun $*" >> "$LOG"
while [[ $1 == -* ]]; do shift; done
pids=()
for node in 0 1; do
  SLURM_STEP_ID=0 SLURM_STEPID=0 SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 \\
  SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_NODELIST="node[01-02]" \\
  SLURM_STEP_TASKS_PER_NODE="1(x2)" "$@" > "task$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_the_sbatch_script_runs_a_stage_that_is_not_distributed_once(tmp_path):
    """`sbatch ade20k_vit_s.sbatch download` on 2 nodes: srun starts the stage on both, node
    0 generates the dataset and logs one MLflow run, node 1 says it skips and exits 0."""
    from mlflow.tracking import MlflowClient

    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "srun").write_text(_SRUN)
    (tools / "srun").chmod(0o755)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    params.update(
        data_root="data/synthetic",
        synthetic_num_train=2,
        synthetic_num_val=1,
        synthetic_image_size=64,
        mlflow_tracking_uri=store,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not _PLACEMENT_VARIABLES.match(k)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        PATH=f"{tools}{os.pathsep}{BIN}{os.pathsep}{env['PATH']}",
        LOG=str(tmp_path / "calls.log"),
        CTS=str(BIN / "cts"),
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="node[01-02]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NNODES="2",
        PYTHONPATH=str(REPO),
    )
    script = subprocess.run(
        ["bash", str(SBATCH), "download"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tasks = [(tmp_path / f"task{node}.log").read_text() for node in (0, 1)]
    assert script.returncode == 0, (script.stdout + script.stderr + "".join(tasks))[-3000:]
    assert "synthetic:" in tasks[0]
    assert tasks[1].strip().splitlines()[-1] == (
        "download: runs on the job's first process only; this is SLURM node 1 of 2: skipped"
    )
    assert "synthetic:" not in tasks[1]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("cts").experiment_id
    runs = client.search_runs([experiment], "tags.`cts.stage` = 'download'")
    assert len(runs) == 1
