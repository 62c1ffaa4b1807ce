import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cts.cli import app
from cts_stages.params import CHECKS, ParamError, load_params

REPO = Path(__file__).resolve().parents[1]
STAGES = [
    "download",
    "preprocess",
    "train_policy",
    "train_segmenter",
    "eval_ss",
    "eval_ms",
    "benchmark",
    "sweep",
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
        ("token_reduction=dyvit", r"token_reduction='dyvit': allowed: cts, tome, algm, none"),
        ("tome_r=-1", r"tome_r=-1: allowed: an integer >= 0"),
        ("algm_threshold=0", r"algm_threshold=0: allowed: a finite number > 0.0 and <= 1.0"),
        ("algm_layers=[5,1]", r"algm_layers=\[5, 1\]: allowed: a non-empty list of increasing"),
        ("algm_layers=[]", r"algm_layers=\[\]: allowed: a non-empty list"),
        ("sweep_algm_thresholds=[1.0]", r"sweep_algm_thresholds=\[1.0\]: allowed: a list of"),
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
        ("lr=0", r"lr=0: allowed: a finite number > 0"),
        ("ms_scales=[]", r"ms_scales=\[\]: allowed: a non-empty list"),
        ("batch_sise=4", r"--set: unknown parameter 'batch_sise': did you mean 'batch_size'"),
        ("lr=.inf", r"--set lr=inf: allowed: a finite number > 0"),
        ("lr=.nan", r"--set lr=nan: allowed: a finite number"),
        ("drop_path_rate=.nan", r"drop_path_rate=nan: allowed: a finite number"),
        ("ms_scales=[1.0, .inf]", r"ms_scales=\[1.0, inf\]: allowed: a non-empty list of posit"),
        (
            "backbone=resnet50",
            r"--set backbone: backbone 'resnet50' cannot share tokens: ResNet is",
        ),
        ("train_unshared_fraction=1.5", r"train_unshared_fraction=1.5: allowed: a finite number"),
        ("train_unshared_fraction=[0.5]", r"train_unshared_fraction=\[0.5\]: allowed: a finite"),
        ("train_tokens_shared_range=[205, 52]", r"range=\[205, 52\]: allowed: null or \[low, h"),
        ("train_tokens_shared_range=103", r"train_tokens_shared_range=103: allowed: null or"),
        (
            "train_tokens_shared_range=[0, 300]",
            r"train_tokens_shared_range=\[0, 300\]: K=300: allowed 0\.\.256 for crop_size 512",
        ),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(params_file, override, message):
    with pytest.raises(ParamError, match=message):
        load_params(params_file, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "sweep_tokens_shared=[0,52,300]",
            r"K=300 is out of range: allowed 0\.\.256 for crop_size 512",
        ),
        (
            "sweep_tokens_shared=[-1,52]",
            r"K=-1 is out of range: allowed 0\.\.256 for crop_size 512",
        ),
        ("sweep_tokens_shared=52", r"sweep_tokens_shared=52: allowed: a list of integers"),
        ("sweep_tokens_shared=[0.5]", r"allowed: a list of integers"),
    ],
)
def test_sweep_values_are_checked_against_the_crop_before_any_work(
    params_file, tmp_path, monkeypatch, override, message
):
    with pytest.raises(ParamError, match=message):
        load_params(params_file, [override], keys=["sweep_tokens_shared", "crop_size", "backbone"])
    monkeypatch.chdir(tmp_path)  # no checkpoint here: a later failure would name train_segmenter
    result = runner.invoke(app, ["sweep", "--params", str(params_file), "--set", override])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "sweep_tokens_shared" in lines[0], result.output


def test_an_empty_sweep_is_allowed(params_file):
    params = load_params(params_file, ["sweep_tokens_shared=[]"])
    assert params["sweep_tokens_shared"] == []


def test_overrides_read_numbers_written_without_a_dot(params_file):
    params = load_params(params_file, ["lr=3e-4", "depth=null", "policy=none"])
    assert params["lr"] == 3e-4 and params["depth"] is None and params["policy"] == "none"


def test_only_the_stage_keys_are_checked(params_file):
    data = yaml.safe_load(params_file.read_text())
    data["policy"] = "learned"
    params_file.write_text(yaml.safe_dump(data))
    params = load_params(params_file, keys=["bench_batch_size", "device"])
    assert params["bench_batch_size"] == data["bench_batch_size"]
    assert params["policy"] == "learned"  # read as written: this stage does not use it
    with pytest.raises(ParamError, match=r"policy='learned': allowed: none, policy_net"):
        load_params(params_file, keys=["bench_batch_size", "policy"])


def _edit(params_file: Path, old: str, new: str) -> None:
    text = params_file.read_text()
    assert old in text
    params_file.write_text(text.replace(old, new, 1))


def test_unknown_key_in_the_file_names_the_closest_known_one(params_file):
    _edit(params_file, "\niterations:", "\niteratons:")
    with pytest.raises(ParamError, match=r"params.yaml: unknown parameter 'iteratons': did you"):
        load_params(params_file, keys=["device"])


def test_duplicate_key_in_the_file_is_an_error_with_its_lines(params_file):
    params_file.write_text(params_file.read_text() + "seed: 3\n")
    with pytest.raises(ParamError, match=r"line \d+, column 1: duplicate key 'seed' \(first at"):
        load_params(params_file)


def test_yaml_syntax_error_keeps_line_and_column(params_file):
    lines = params_file.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if line.startswith("ms_scales:"))
    lines[number] = "ms_scales: [0.75, 1.0"
    params_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ParamError, match=r"params.yaml is not valid YAML: line \d+, column \d+: "):
        load_params(params_file)


def test_numbers_without_a_dot_in_the_file_are_numbers(params_file):
    _edit(params_file, "\nlr: 3.0e-4", "\nlr: 1e-4")
    _edit(params_file, "policy_lr: 1.0e-3", "policy_lr: 5E-5")
    params = load_params(params_file)
    assert params["lr"] == 1e-4 and params["policy_lr"] == 5e-5
    _edit(params_file, "\nweight_decay: 1.0e-2", "\nweight_decay: .inf")
    with pytest.raises(ParamError, match=r"params.yaml: weight_decay=inf: allowed: a finite"):
        load_params(params_file)


def test_set_of_a_key_the_stage_does_not_read_is_checked_and_warned(params_file, capsys):
    with pytest.raises(ParamError, match=r"--set ms_scales=\[0\]: allowed"):
        load_params(params_file, ["ms_scales=[0]"], keys=["device"], stage="train_segmenter")
    load_params(params_file, ["ms_scales=[1.0]"], keys=["device"], stage="train_segmenter")
    assert "--set ms_scales: `cts train_segmenter` does not read it" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "pascal_context"])
def test_dataset_configs_are_complete_and_valid(name):
    assert set(load_params(REPO / "configs" / f"{name}.yaml")) == set(CHECKS)


def test_dvc_yaml_lists_exactly_the_params_each_stage_reads():
    import importlib

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    from cts_stages.launch import LAUNCH_PARAMS

    runtime_only = {
        "num_workers",
        "mlflow_tracking_uri",
        "mlflow_registered_model",
        "checkpoint_every",
        *LAUNCH_PARAMS,
    }
    assert list(dvc["stages"]) == STAGES
    for stage in STAGES:
        reads = set(importlib.import_module(f"cts_stages.{stage}").PARAMS) - runtime_only
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
    assert "cts download" in result.output and "nowhere in params" not in result.output


def test_missing_folder_dataset_says_what_to_put_there(params_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        ["download", "-p", str(params_file), "-S", "dataset=folder", "-S", "data_root=mine"],
    )
    assert result.exit_code == 1
    assert "images/{train,val}" in result.output and "classes.txt" in result.output
    assert "run `cts download`" not in result.output and "'mine'" not in result.output


def test_a_stage_that_does_not_read_k_validates_params_without_it(tmp_path):
    """A Kubeflow task's params hold only its stage's keys: the sweep's have no
    num_tokens_shared, and the geometry check looked it up all the same (KeyError)."""
    import importlib

    from cts_stages.params import load_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = importlib.import_module("cts_stages.sweep").PARAMS
    own = {key: value for key, value in params.items() if key in keys}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(own))
    loaded = load_params(path, (), keys=keys, stage="sweep")
    assert "num_tokens_shared" not in keys and loaded["crop_size"] == params["crop_size"]
