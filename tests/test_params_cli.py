import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cts.cli import app
from stages.params import CHECKS, ParamError, load_params

REPO = Path(__file__).resolve().parents[1]
STAGES = [
    "download",
    "preprocess",
    "train_policy",
    "train_segmenter",
    "eval_ss",
    "eval_ms",
    "benchmark",
]
runner = CliRunner()


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return path


def test_repository_params_are_valid_and_complete(params_file):
    params = load_params(params_file)
    assert set(params) == set(CHECKS)
    assert params["crop_size"] == 512 and params["num_tokens_shared"] == 103


@pytest.mark.parametrize(
    "override, message",
    [
        ("policy=learned", r"policy='learned': allowed: none, policy_net, oracle, random"),
        ("precision=fp8", r"precision='fp8': allowed: auto, fp32, bf16, fp16"),
        (
            "train_scale_range=[2.0, 1.0]",
            r"train_scale_range=\[2\.0, 1\.0\]: allowed: \[low, high\]",
        ),
        ("loss_stride=0", r"loss_stride=0: allowed: an integer >= 1"),
        ("photometric=maybe", r"photometric='maybe': allowed: true, false"),
        ("num_tokens_shared=257", r"num_tokens_shared=257: allowed 0\.\.256 for crop_size 512"),
        ("num_tokens_shared=-1", r"num_tokens_shared=-1: allowed: an integer >= 0"),
        ("crop_size=500", r"crop_size=500: allowed multiples of 32"),
        ("device=tpu", r"device='tpu': allowed: auto, cpu, cuda"),
        ("lr=0", r"lr=0: allowed: a number > 0"),
        ("ms_scales=[]", r"ms_scales=\[\]: allowed: a non-empty list"),
        ("batch_sise=4", r"unknown parameter 'batch_sise'"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(params_file, override, message):
    with pytest.raises(ParamError, match=message):
        load_params(params_file, [override])


def test_overrides_read_numbers_written_without_a_dot(params_file):
    params = load_params(params_file, ["lr=3e-4", "depth=null", "policy=none"])
    assert params["lr"] == 3e-4 and params["depth"] is None and params["policy"] == "none"


def test_only_the_stage_keys_are_checked(params_file):
    data = yaml.safe_load(params_file.read_text())
    data["benchmark_unrelated"] = 1
    data["policy"] = "learned"
    params_file.write_text(yaml.safe_dump(data))
    load_params(params_file, keys=["bench_batch_size", "device"])


def test_dvc_yaml_lists_exactly_the_params_each_stage_reads():
    import importlib

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    runtime_only = {"num_workers", "mlflow_tracking_uri", "checkpoint_every"}
    assert list(dvc["stages"]) == STAGES
    for stage in STAGES:
        reads = set(importlib.import_module(f"stages.{stage}").PARAMS) - runtime_only
        assert set(dvc["stages"][stage]["params"]) == reads, stage
        assert dvc["stages"][stage]["cmd"] == f"cts {stage}"
    downstream = {s for s in STAGES if "num_tokens_shared" in dvc["stages"][s]["params"]}
    assert downstream == {"train_segmenter"}


@pytest.mark.parametrize("command", STAGES)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "--params" in result.output and "--set" in result.output


def test_bad_param_is_one_line_and_exit_1(params_file):
    result = runner.invoke(
        app, ["train_segmenter", "--params", str(params_file), "--set", "policy=learned"]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "allowed: none, policy_net, oracle, random" in lines[0]


def test_stage_out_of_order_names_the_stage_to_run_first(
    params_file, tmp_path, monkeypatch, tiny_synthetic
):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        ["train_segmenter", "--params", str(params_file), "--set", f"data_root={tiny_synthetic}"],
    )
    assert result.exit_code == 1
    assert "checkpoints/policy.pt not found: run `cts train_policy`" in result.output
    result = runner.invoke(
        app, ["eval_ss", "--params", str(params_file), "--set", f"data_root={tiny_synthetic}"]
    )
    assert "run `cts train_segmenter`" in result.output


def test_missing_dataset_says_how_to_get_it(params_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["preprocess", "--params", str(params_file), "--set", "data_root=data/nowhere"]
    )
    assert result.exit_code == 1
    assert "cts download" in result.output
