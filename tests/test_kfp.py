"""`cts kfp`: the Kubeflow pipeline built from dvc.yaml, compiled, and run with KFP's local
subprocess runner against a `dvc repro` of the same params (the session's micro pipeline).

kfp is the `cluster` extra, which `make test` installs: without it these tests fail to import
rather than skip.
"""

import csv
import json
import re
import tempfile
from pathlib import Path

import kfp
import pytest
import yaml
from helpers import BIN, PIPELINE_TIMEOUT, REPO, needs_dvc, run
from mlflow import MlflowClient
from typer.testing import CliRunner

from cts.cli import app
from cts_stages.params import parse_override

# Measurements that differ between two runs of the same model; everything else must agree.
TIMING = re.compile(r"per_sec|ms_per|seconds|speedup|policy_share")


def _task(stage: str) -> str:
    return stage.replace("_", "-")


def _dvc_stages(dvc_yaml: Path = REPO / "dvc.yaml") -> dict[str, dict]:
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def _paths(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _writes(spec: dict) -> list[str]:
    return _paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots"))


def _upstream(stages: dict[str, dict], name: str) -> set[str]:
    """The stages that write a dep of ``name`` (or a folder holding it), from dvc.yaml."""
    deps = _paths(stages[name].get("deps"))
    return {
        other
        for other, spec in stages.items()
        if other != name
        for out in _writes(spec)
        for dep in deps
        if dep == out or dep.startswith(out.rstrip("/") + "/")
    }


def _compile(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(
        app,
        ["kfp", "compile", "--out", str(out), "--dvc-yaml", str(REPO / "dvc.yaml")]
        + ["--params", str(REPO / "params.yaml"), *args],
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.yaml"]  # no temporary left
    kfp.components.load_component_from_file(str(out))  # KFP reads its IR back
    return yaml.safe_load(out.read_text())


def test_the_ir_has_a_task_per_stage_ordered_by_deps_with_params_and_gpus(tmp_path):
    ir = _compile(tmp_path)
    stages = _dvc_stages()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {_task(name) for name in stages}
    defaults = ir["root"]["inputDefinitions"]["parameters"]
    assert set(defaults) == set(params)
    for key, value in params.items():
        assert parse_override(f"{key}={defaults[key]['defaultValue']}")[1] == value, key
    # How a stage runs, not what it computes: no stage lists them, every task gets them.
    runtime = set(params) - {key for spec in stages.values() for key in spec["params"]}
    assert {"nproc_per_node", "mlflow_tracking_uri"} <= runtime
    for name, spec in stages.items():
        task = tasks[_task(name)]
        assert set(task.get("dependentTasks", [])) == {_task(s) for s in _upstream(stages, name)}
        wired = dict(task["inputs"]["parameters"])
        # The pipeline job's name: the MLflow parent that the tasks of one run share.
        run_name = wired.pop("cts_pipeline_run")["runtimeValue"]["constant"]
        assert run_name == "{{$.pipeline_job_name}}"
        assert set(wired) == set(spec["params"]) | runtime  # what Kubeflow's cache keys on
        assert all(wired[key]["componentInputParameter"] == key for key in wired)
        artifacts = task["inputs"].get("artifacts", {}).values()
        producers = {a["taskOutputArtifact"]["producerTask"] for a in artifacts}
        assert producers == set(task.get("dependentTasks", []))  # the order is the data's
        component = ir["components"][task["componentRef"]["name"]]
        container = ir["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        assert repr(["cts", name]) in container["command"][-1]  # the source KFP ships
        accelerator = container.get("resources", {}).get("accelerator")
        if "device" in spec["params"]:  # the stages that run a model
            assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["count"] == "1"
        else:
            assert accelerator is None
    assert {"download", "preprocess"} < stages.keys() and "device" in stages["eval_ss"]["params"]


def test_no_gpu_requests_with_gpus_0(tmp_path):
    ir = _compile(tmp_path, "--gpus", "0", "--image", "registry.example/cts:1")
    containers = [e["container"] for e in ir["deploymentSpec"]["executors"].values()]
    assert all("resources" not in c for c in containers)
    assert {c["image"] for c in containers} == {"registry.example/cts:1"}


NOT_CTS = "is not a `cts` command; a Kubeflow component runs `cts <stage>`"
BAD_STAGES = {
    "python train.py": f"cmd 'python train.py' {NOT_CTS}",
    "cts --help": f"cmd 'cts --help' {NOT_CTS}",
    "cts eval_ss --set device=cpu": (
        "cmd 'cts eval_ss --set device=cpu' passes --set; the Kubeflow task passes the params "
        "itself"
    ),
    # It would fail only on the cluster: `cts` has no such command, or not as a stage.
    **{
        f"cts {name}": (
            f"cmd 'cts {name}' is not a `cts` pipeline stage (download, preprocess, "
            "train_policy, train_segmenter, eval_ss, eval_ms, benchmark, sweep); a Kubeflow "
            "component runs `cts <stage>`"
        )
        for name in ("nosuchstage", "config --list")
    },
    # The task runs the words without a shell: `&&` would be an argument of `cts download`.
    "cts download && rm -rf /": (
        "cmd 'cts download && rm -rf /': `cts download` takes no '&&'; a Kubeflow component "
        "runs `cts <stage>` with only the stage's own flags (none)"
    ),
    "cts train_segmenter --no-resume --resume=1": (
        "cmd 'cts train_segmenter --no-resume --resume=1': `cts train_segmenter` takes no "
        "'--resume=1'; a Kubeflow component runs `cts <stage>` with only the stage's own flags "
        "(--no-resume, --resume)"
    ),
}


def _compile_dvc_yaml(tmp_path: Path, stages: dict) -> tuple[Path, Path, object]:
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(
        app,
        ["kfp", "compile", "--out", str(out), "--dvc-yaml", str(dvc_yaml)]
        + ["--params", str(REPO / "params.yaml")],
    )
    return dvc_yaml, out, result


@pytest.mark.parametrize("cmd", sorted(BAD_STAGES))
def test_a_stage_that_is_not_a_cts_command_is_one_line_before_any_work(tmp_path, cmd):
    stages = _dvc_stages()
    stages["eval_ss"]["cmd"] = cmd
    dvc_yaml, out, result = _compile_dvc_yaml(tmp_path, stages)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: kfp compile: {dvc_yaml}: stage 'eval_ss': {BAD_STAGES[cmd]}"
    ]
    assert not out.exists()


def test_a_stage_with_its_own_flags_compiles(tmp_path):
    stages = _dvc_stages()
    stages["train_segmenter"]["cmd"] = "cts train_segmenter --no-resume"
    _, out, result = _compile_dvc_yaml(tmp_path, stages)
    assert result.exit_code == 0, result.output
    assert "--no-resume" in out.read_text()


def test_a_param_the_params_file_lacks_is_one_line(tmp_path):
    stages = _dvc_stages()
    stages["benchmark"]["params"].append("bench_warmup")
    dvc_yaml, out, result = _compile_dvc_yaml(tmp_path, stages)
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: kfp compile: {dvc_yaml}: stage 'benchmark' reads param 'bench_warmup', "
        "which the params file lacks"
    )
    assert not out.exists()


def test_an_out_outside_the_repository_is_one_line(tmp_path):
    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(
        app,
        ["kfp", "compile", "--out", str(out), "--dvc-yaml", str(REPO / "dvc.yaml")]
        + ["--params", str(REPO / "params.yaml"), "--set", "data_root=/srv/data"],
    )
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: kfp compile: dvc.yaml path '${data_root}' (= '/srv/data'): a Kubeflow artifact "
        "must be a path inside the repository (relative, without '..')"
    )
    assert not out.exists()


def test_run_local_refuses_an_existing_folder(tmp_path):
    result = CliRunner().invoke(app, ["kfp", "run_local", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: kfp run_local: {tmp_path} already exists; choose a new folder for the results"
    )


class _Artifact:
    """What the KFP executor hands a component: a path, and for metrics ``log_metric``."""

    def __init__(self, path: Path) -> None:
        self.path, self.metrics = str(path), {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = value


@pytest.mark.e2e  # a `cts` process, as the tasks run
def test_a_task_whose_command_fails_fails_in_one_line_and_leaves_no_work_folder(
    tmp_path, monkeypatch
):
    from cts_stages.kfp_task import run_task

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the work folder goes
    with pytest.raises(RuntimeError, match=r"^`cts config --list` failed with exit status 2$"):
        run_task(["cts", "config", "--list"], {"seed": "0"}, {}, {}, {})  # takes no --params
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_a_task_links_its_inputs_moves_its_outs_and_names_a_missing_one(
    tiny_synthetic, tmp_path, monkeypatch
):
    from cts_stages.kfp_task import run_task

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    params = {"data_root": "data/tiny", "backbone": "vit_tiny_patch16_384", "crop_size": "128"}
    params["mlflow_tracking_uri"] = f"sqlite:///{tmp_path / 'mlruns.db'}"
    preprocessed = _Artifact(out / "preprocessed")
    metrics = {"metrics/dataset.json": _Artifact(out / "dataset.json")}
    metrics["metrics/none.json"] = _Artifact(out / "none.json")
    with pytest.raises(FileNotFoundError) as error:
        run_task(
            ["cts", "preprocess"],
            params,
            {"${data_root}": _Artifact(tiny_synthetic)},
            {"preprocessed": preprocessed},
            metrics,
            pipeline_run="cts-20261201-abc",
        )
    assert str(error.value) == (
        "`cts preprocess` did not write metrics/none.json, which its dvc.yaml stage lists"
    )
    assert (out / "preprocessed" / "policy_targets.npz").is_file()
    written = json.loads((out / "dataset.json").read_text())
    assert written["train_images"] == 4 and written["val_images"] == 2
    assert metrics["metrics/dataset.json"].metrics["train_images"] == 4.0
    assert list(work.iterdir()) == []
    # The stage's MLflow parent is the pipeline run's, whatever params this task holds.
    client = MlflowClient(params["mlflow_tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, "tags.`cts.run_kind` = 'pipeline'")
    assert [run.data.tags["cts.pipeline_key"] for run in parents] == ["cts-20261201-abc"]
    assert parents[0].info.run_name == "cts-20261201-abc"
    assert (tiny_synthetic / "dataset.yaml").is_file()  # the linked input is left alone


def _rows(path: Path) -> list[dict]:
    """A CSV's rows without its timing columns."""
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if not TIMING.search(k)} for row in csv.DictReader(f)]


def _values(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not TIMING.search(k)}


# The stages the local run compares: each kind of task (data, both trainings, an evaluation)
# once; eval_ms, benchmark and sweep are tasks of the same kind, and each costs the suite
# ~15 s of a cts process here.
LOCAL_RUN_STAGES = ("download", "preprocess", "train_policy", "train_segmenter", "eval_ss")


@needs_dvc
@pytest.mark.e2e
def test_the_local_run_writes_what_dvc_repro_writes(micro_pipeline, tmp_path):
    repo, env = micro_pipeline.repo, micro_pipeline.env
    out = tmp_path / "run" / "kfp"
    store = f"sqlite:///{tmp_path / 'kfp-mlruns.db'}"
    stages = {name: _dvc_stages(repo / "dvc.yaml")[name] for name in LOCAL_RUN_STAGES}
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    command = [str(BIN / "cts"), "kfp", "run_local", "--out", str(out)]
    command += ["--dvc-yaml", str(dvc_yaml), "--set", f"mlflow_tracking_uri={store}"]
    output = run(command, repo, env, timeout=PIPELINE_TIMEOUT)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    written = sum(len(_writes(spec)) for spec in stages.values())
    assert f"written: {written} outputs in {out}" in output.splitlines()
    compared = []
    for spec in stages.values():
        for path in _writes(spec):
            path = path.replace("${data_root}", params["data_root"])
            assert (out / path).exists(), path
            if path.endswith(".json"):
                assert _values(out / path) == _values(repo / path), path
            elif path.endswith(".csv"):
                assert _rows(out / path) == _rows(repo / path), path
            else:
                continue
            compared.append(path)
    metrics = ("dataset", "policy", "train", "eval_ss")
    assert {f"metrics/{name}.json" for name in metrics} < set(compared)
    assert [p.name for p in out.parent.iterdir()] == ["kfp"]  # no staging or KFP folder left
