"""`cts config`: one params file per row of the authors' results table, checked against it."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from cts.cli import app
from cts.geometry import num_patches, paper_num_shared, tokens_kept
from cts.models import Segmenter
from cts.paper import PAPER_SETTINGS, PATCH_SIZE, paper_setting
from cts_stages.common import segmenter_config
from cts_stages.config import dvc_args, render
from cts_stages.params import CHECKS, ParamError, load_params

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# The authors' table (tue-mps/cts-segmenter README) and the backbones' shapes (timm / the
# authors' segm/config.yml), written out: name -> (dataset, backbone, width, depth, crop,
# N = (crop/16)^2 patch tokens, K shared superpatches, N - 3K tokens, reduction %).
PAPER = {
    "ade20k-vit-ti": ("ade20k", "vit_tiny_patch16_384", 192, 12, 512, 1024, 103, 715, 30),
    "ade20k-vit-s": ("ade20k", "vit_small_patch16_384", 384, 12, 512, 1024, 103, 715, 30),
    "ade20k-vit-b": ("ade20k", "vit_base_patch16_384", 768, 12, 512, 1024, 103, 715, 30),
    "ade20k-vit-l-640": ("ade20k", "vit_large_patch16_384", 1024, 24, 640, 1600, 160, 1120, 30),
    "pascal-context-vit-s": (
        "pascal_context",
        "vit_small_patch16_384",
        384,
        12,
        480,
        900,
        90,
        630,
        30,
    ),
    "cityscapes-vit-s": ("cityscapes", "vit_small_patch16_384", 384, 12, 768, 2304, 336, 1296, 44),
}
# What a row may change in its dataset's file in configs/.
ROW_KEYS = {
    "backbone",
    "crop_size",
    "num_tokens_shared",
    "base_size",
    "eval_window",
    "sweep_tokens_shared",
}


def emitted(name: str, tmp_path: Path) -> tuple[str, dict]:
    """`cts config NAME` on stdout, and that file read by the pipeline's own validation."""
    result = runner.invoke(app, ["config", name])
    assert result.exit_code == 0, result.output
    path = tmp_path / f"{name}.yaml"
    path.write_text(result.stdout)
    return result.stdout, load_params(path)


def test_the_rows_are_the_six_of_the_papers_table():
    assert [s.name for s in PAPER_SETTINGS] == list(PAPER)
    result = runner.invoke(app, ["config", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 + len(PAPER)
    for line, (name, row) in zip(lines[1:], PAPER.items(), strict=True):
        _, backbone, _, _, crop, n, k, tokens, percent = row
        fields = line.split()
        assert (fields[0], fields[2]) == (name, backbone)
        assert fields[3:] == [str(crop), str(k), str(n), "->", str(tokens), f"{percent}%"]


def test_the_rows_patch_size_is_their_backbones():
    from cts.models.vit import backbone_patch_size

    assert {backbone_patch_size(s.backbone) for s in PAPER_SETTINGS} == {PATCH_SIZE}


@pytest.mark.parametrize("name", list(PAPER))
def test_row_builds_the_papers_model_on_the_meta_device(name, tmp_path):
    dataset, backbone, width, depth, crop, n, k, tokens, percent = PAPER[name]
    text, params = emitted(name, tmp_path)
    assert set(params) == set(CHECKS)
    assert (params["dataset"], params["backbone"]) == (dataset, backbone)
    assert (params["crop_size"], params["num_tokens_shared"]) == (crop, k)
    assert params["depth"] is None and params["decoder"] == "mask_transformer"
    assert params["policy"] == "policy_net"
    # The row as cts/paper.py and the token geometry compute it (what `cts config --list`
    # prints and the pipeline uses), against the authors' numbers.
    setting = paper_setting(name)
    assert (setting.patch_tokens, setting.tokens, round(100 * setting.reduction)) == (
        n,
        tokens,
        percent,
    )
    assert (num_patches(crop, PATCH_SIZE), tokens_kept(n, k)) == (n, tokens)
    assert percent != 30 or paper_num_shared(crop, PATCH_SIZE) == k
    assert k in params["sweep_tokens_shared"] or not params["sweep_tokens_shared"]

    # The authors evaluate every row with a window of the crop, inside the short side.
    info = importlib.import_module(f"cts.data.{dataset}").dataset_info()
    window = params["eval_window"] or info.window
    stride = params["eval_stride"] or info.stride
    assert window == crop and stride <= window <= (params["base_size"] or info.base_size)

    # The model the pipeline builds from these params, without weights or memory.
    config = segmenter_config({**params, "pretrained": False}, info.num_classes)
    with torch.device("meta"):
        model = Segmenter(config).eval()
        images = torch.empty(2, 3, crop, crop)
        with torch.no_grad():
            shared = model(images, num_tokens_shared=k)
            plain = model(images, num_tokens_shared=0)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert model.encoder.embed_dim == width and len(model.encoder.vit.blocks) == depth
    assert model.patch_size == 16 and model.num_tokens_shared == k
    assert (plain.num_tokens, shared.num_tokens) == (n, tokens)
    assert tuple(shared.shared.shape) == (2, crop // 32, crop // 32)
    assert tuple(shared.logits.shape) == (2, info.num_classes, crop, crop)


def test_vit_l_640_trains_and_evaluates_at_640(tmp_path):
    _, params = emitted("ade20k-vit-l-640", tmp_path)
    assert (params["crop_size"], params["base_size"], params["eval_window"]) == (640, 640, 640)
    assert params["eval_stride"] is None  # the dataset's 512, as the authors
    assert params["sweep_tokens_shared"] == [0, 40, 80, 120, 160, 240, 320]
    for name in ("ade20k-vit-s", "pascal-context-vit-s", "cityscapes-vit-s"):
        _, params = emitted(name, tmp_path)
        assert params["base_size"] is None and params["eval_window"] is None


@pytest.mark.parametrize("name", list(PAPER))
def test_row_is_its_datasets_file_with_the_rows_values_and_its_comments(name, tmp_path):
    dataset = PAPER[name][0]
    source = REPO / "configs" / f"{dataset}.yaml"
    text, params = emitted(name, tmp_path)
    base = load_params(source)
    assert {key for key in params if params[key] != base[key]} <= ROW_KEYS
    assert f"`cts config {name}`" in "".join(text.splitlines()[:4]) and "cp configs" not in text
    # Every comment of the file's body is kept, on the same key.
    body = [line for line in source.read_text().splitlines() if line.strip()]
    while body[0].startswith("#"):
        body.pop(0)
    kept = [line for line in text.splitlines() if line.strip()][-len(body) :]
    for old, new in zip(body, kept, strict=True):
        assert old.split(":")[0] == new.split(":")[0]
        assert ("#" in old) == ("#" in new) and old.partition("#")[2] == new.partition("#")[2]


def test_vit_s_rows_are_their_datasets_files(tmp_path):
    for name, dataset in [
        ("ade20k-vit-s", "ade20k"),
        ("pascal-context-vit-s", "pascal_context"),
        ("cityscapes-vit-s", "cityscapes"),
    ]:
        assert emitted(name, tmp_path)[1] == load_params(REPO / "configs" / f"{dataset}.yaml")


def test_out_writes_and_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("mine: true\n")
    result = runner.invoke(app, ["config", "ade20k-vit-b", "--out", str(path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "exists: pass --force" in lines[0]
    assert path.read_text() == "mine: true\n"

    result = runner.invoke(app, ["config", "ade20k-vit-b", "--out", str(path), "--force"])
    assert result.exit_code == 0, result.output
    assert path.read_text() == render("ade20k-vit-b")[0]
    fresh = tmp_path / "runs" / "cityscapes.yaml"
    result = runner.invoke(app, ["config", "cityscapes-vit-s", "-o", str(fresh)])
    assert result.exit_code == 0, result.output
    assert load_params(fresh)["crop_size"] == 768
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "cityscapes.yaml",
        "params.yaml",
    ]  # no temporary file left


def test_force_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("mine: true\n")
    path.chmod(0o640)
    result = runner.invoke(app, ["config", "ade20k-vit-b", "--out", str(path), "--force"])
    assert result.exit_code == 0, result.output
    assert path.read_text() == render("ade20k-vit-b")[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_force_writes_through_a_symlink_to_its_target(tmp_path):
    """As the shell's ``>`` does: the link stays a link, the file it names gets the params."""
    target = tmp_path / "configs" / "mine.yaml"
    target.parent.mkdir()
    target.write_text("mine: true\n")
    target.chmod(0o600)
    link = tmp_path / "params.yaml"
    link.symlink_to(Path("configs") / "mine.yaml")
    result = runner.invoke(app, ["config", "ade20k-vit-b", "--out", str(link), "--force"])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.readlink() == Path("configs") / "mine.yaml"
    assert target.read_text() == render("ade20k-vit-b")[0]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["configs", "mine.yaml", "params.yaml"]


def _queued_params(set_params: list[str], tmp_path: Path) -> dict:
    """The params of a `dvc exp run -S ...` experiment: the repository's params.yaml with
    the overrides applied by DVC's own code (its grouping, its Hydra + YAML rewrite)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    overrides = to_path_overrides(set_params)
    assert list(overrides) == ["params.yaml"]
    apply_overrides(path, overrides["params.yaml"])
    return load_params(path)


def _dvc_exp_run(argv: list[str]) -> list[str]:
    """The ``-S`` values of ``dvc exp run ARGV``, as DVC's command line parses them."""
    from dvc.cli import parse_args

    parsed = parse_args(["exp", "run", *argv])
    assert parsed.queue
    return parsed.set_param


@pytest.mark.parametrize("name", list(PAPER))
def test_dvc_args_give_the_same_params_through_dvcs_own_parsing(name, tmp_path):
    """`dvc exp run -S ...` on the repository's params.yaml ends at the row's params; a
    later -S wins (the no-sharing baseline of the row)."""
    result = runner.invoke(app, ["config", name, "--dvc-args"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # one argument a line
    assert len(lines) == len(CHECKS) and all(line.startswith("--set-param=") for line in lines)
    expected = render(name)[1]
    for extra, want in [([], expected), (["-S", "num_tokens_shared=0"], {"num_tokens_shared": 0})]:
        set_params = _dvc_exp_run(["--queue", *lines, *extra])
        assert _queued_params(set_params, tmp_path) == {**expected, **want}


def _recipe(shell: str) -> str:
    """docs/paper.md's line that queues `cts config cityscapes-vit-s --dvc-args` in ``shell``."""
    text = (REPO / "docs" / "paper.md").read_text()
    for body in re.findall(rf"^```{shell}\n(.*?)^```", text, re.M | re.S):
        for line in body.splitlines():
            if "cts config cityscapes-vit-s --dvc-args" in line and "dvc exp run --queue" in line:
                return line.split(" #")[0]
    raise AssertionError(f"docs/paper.md: no {shell} line queues --dvc-args")


def _run_recipe(shell: str, recipe: str, tmp_path: Path, files: list[str]) -> list[str] | None:
    """Run ``recipe`` in a folder holding ``files``, with `cts` this repository's and a
    stand-in `dvc` that records its arguments: those arguments (None: dvc did not run)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(parents=True)
    for name, script in [
        ("cts", f'exec {shlex.quote(sys.executable)} -m cts.cli "$@"'),
        ("dvc", 'printf "%s\\0" "$@" > "$ARGV_FILE"'),
    ]:
        (bin_ / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_ / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    for name in files:
        (work / name).touch()
    argv_file = tmp_path / "argv"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "ARGV_FILE": str(argv_file)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    subprocess.run([shell, "-c", recipe], cwd=work, env=env, timeout=300, check=False)
    return argv_file.read_bytes().decode().split("\0")[:-1] if argv_file.exists() else None


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_documented_queue_recipe_survives_files_named_like_a_glob_match(shell, tmp_path):
    """A list value (``train_scale_range=[0.5,2.0]``) is a glob pattern: an unquoted
    ``$args`` would become a file it matches (``train_scale_range=0``). The recipe passes
    every param as it is, and queues nothing when `cts config` fails."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    recipe = _recipe(shell)
    expected = render("cityscapes-vit-s")[1]
    matches = [f"{key}={str(v[0])[0]}" for key, v in expected.items() if isinstance(v, list) and v]
    assert "train_scale_range=0" in matches
    argv = _run_recipe(shell, recipe, tmp_path, matches)
    assert argv is not None and argv[:3] == ["exp", "run", "--queue"]
    assert _queued_params(_dvc_exp_run(argv[2:]), tmp_path) == expected
    failing = recipe.replace("cityscapes-vit-s", "no-such-row")
    assert _run_recipe(shell, failing, tmp_path / "failing", []) is None
    option = next(
        p for p in typer.main.get_command(app).commands["config"].params if p.name == "dvc_args"
    )
    if shell == "bash":  # the option's help shows the same recipe
        assert recipe.replace("cityscapes-vit-s", "NAME") in option.help.replace("\\[", "[")


@pytest.mark.parametrize(
    "value", ["my data", "on", "inf", "null", "a,b", "${x}", "it's", "1e3", "data/[ab]"]
)
def test_dvc_args_refuse_a_value_that_would_not_round_trip(value):
    with pytest.raises(ParamError, match="data_root"):
        dvc_args({"data_root": value})


def test_unknown_setting_is_one_line_that_names_the_settings():
    result = runner.invoke(app, ["config", "ade20k-vit-h"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'ade20k-vit-h'" in lines[0]
    assert all(name in lines[0] for name in PAPER)


@pytest.mark.parametrize(
    "args",
    [
        ["ade20k-vit-s", "--force"],
        ["ade20k-vit-s", "--dvc-args", "--out", "x.yaml"],
        ["ade20k-vit-s", "--list"],
        ["--out", "x.yaml"],
        ["--list", "--dvc-args"],
    ],
)
def test_options_that_do_not_go_together_are_usage_errors(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["config", *args])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_paper_page_table_lists_every_row():
    readme = (REPO / "docs" / "paper.md").read_text()
    for name, (*_, crop, n, k, tokens, percent) in PAPER.items():
        assert f"| `{name}` |" in readme
        row = readme.split(f"| `{name}` |")[1].splitlines()[0]
        assert f"| {crop} | {n} | {k} | {tokens} | {percent}% |" in row
