"""dvc.yaml lists, for every stage, the project code its command runs.

A stage whose deps miss a module it runs stays "up to date" in `dvc repro` after that module
changes, with outputs the new code would not write (cts/losses.py for train_segmenter,
cts/checkpoint.py for every stage were missing). The modules a stage runs are derived from
the code, not kept by hand: what `cts <stage>` imports (the cts/cli package, then
cts_stages.launch, .params, .common and .<stage>; stages/ installs as cts_stages), followed
through every import statement of the project's modules, module-level and inside functions
(train_segmenter imports cts.serving when it logs the model).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PACKAGE_FOLDERS, REPO, module_name, module_path

# What cts/cli's `run_stage_command` imports before it runs a stage (the stage module itself aside).
COMMAND_ENTRY = ("cts.cli", "cts_stages.launch", "cts_stages.params", "cts_stages.common")
# Modules whose code only reports on a stage and never computes what it writes: a change to
# them must not rerun the pipeline. An entry ending in "/" is a package: each of its modules.
REPORTING_ONLY = {
    "cts/tracking/": "MLflow runs, params and metrics",
    "cts/serving.py": "the MLflow pyfunc model logged beside the checkpoint",
    "cts/progress.py": "progress bars and lines on the terminal",
    "stages/mlflow_context.py": "what a stage's MLflow runs are keyed, named and seeded with",
}
# Function-level imports that are not part of running a stage: each other `cts` command's
# own (the cts/cli package), and the library's lazy public `cts.load_model` (cts/__init__.py).
NOT_STAGE_CODE = {
    *(p.relative_to(REPO).as_posix() for p in (REPO / "cts" / "cli").glob("*.py")),
    "cts/__init__.py",
}


def _module_file(name: str) -> Path | None:
    """The file of a project module (a package's __init__.py), None if there is none."""
    path = module_path(name)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _with_parents(name: str) -> list[str]:
    """Importing `a.b.c` runs `a`, `a.b` and `a.b.c`."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imports(path: Path) -> set[str]:
    """Project modules the file's import statements name (a `from m import x` also names
    `m.x` when x is a submodule); function-level ones too unless the file is NOT_STAGE_CODE."""
    tree = ast.parse(path.read_text(), str(path))
    relative = path.relative_to(REPO).as_posix()
    nodes = tree.body if relative in NOT_STAGE_CODE else list(ast.walk(tree))
    found: set[str] = set()
    package = module_name(path.parent / "__init__.py")
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGE_FOLDERS:
                found.update(n for n in _with_parents(name) if _module_file(n))
    return found


def _reporting_only(path: str) -> bool:
    return any(path == entry or path.startswith(entry) for entry in REPORTING_ONLY)


def stage_modules(stage: str, through_reports: bool = False) -> set[str]:
    """Files (relative, posix) of every project module `cts <stage>` can run; with
    `through_reports`, also those only a reporting module imports."""
    entries = (*COMMAND_ENTRY, f"cts_stages.{stage}")
    pending = [name for entry in entries for name in _with_parents(entry)]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if not through_reports and _reporting_only(path.relative_to(REPO).as_posix()):
            continue  # what a reporting module imports runs for the report, not the outputs
        pending.extend(_imports(path) - seen)
    return {_module_file(name).relative_to(REPO).as_posix() for name in seen}


def _holds_code(path: Path) -> bool:
    body = ast.parse((REPO / path).read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def _dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(_dvc_stages()))
def test_each_stage_lists_the_code_its_command_runs(stage):
    spec = _dvc_stages()[stage]
    assert spec["cmd"] == f"cts {stage}"
    deps = [dep for dep in spec["deps"] if not dep.startswith("${")]
    missing = sorted(
        path
        for path in stage_modules(stage)
        if not _reporting_only(path) and _holds_code(Path(path)) and not _covered(path, deps)
    )
    assert not missing, f"dvc.yaml stage {stage} runs but does not list: {missing}"
    code = [dep for dep in deps if dep.split("/")[0] in PACKAGE_FOLDERS.values()]
    assert [dep for dep in code if not (REPO / dep).exists()] == []


def test_the_derivation_sees_what_a_stage_really_imports():
    """The static walk holds every project module a real `cts train_segmenter` process has
    loaded once it has imported the stage and logged its model (cts.serving, lazily)."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {[*COMMAND_ENTRY, 'cts_stages.train_segmenter', 'cts.serving']!r}:\n"
        "    importlib.import_module(name)\n"
        f"ours = [m for m in sys.modules if m.split('.')[0] in {tuple(PACKAGE_FOLDERS)!r}]\n"
        "print(json.dumps(ours))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = {_module_file(name).relative_to(REPO).as_posix() for name in json.loads(result.stdout)}
    assert "cts/losses.py" in loaded and "cts/checkpoint.py" in loaded
    assert "stages/train_segmenter.py" in loaded
    assert loaded <= stage_modules("train_segmenter", through_reports=True)


def test_bytecode_beside_the_sources_is_not_a_change_to_a_stage():
    """Importing the checkout's code writes __pycache__/ into the package folders that stages
    list as deps (cts/cli, cts/models): DVC must not count those files, or every stage of a
    freshly cloned, committed pipeline reads "modified" once a test or a notebook ran."""
    from dvc.repo import Repo

    repo = Repo(str(REPO))
    for folder in ("cts/cli", "cts/models", "stages"):
        cache = REPO / folder / "__pycache__" / "x.cpython-312.pyc"
        assert repo.dvcignore.is_ignored(repo.fs, str(cache)), f"{cache} counts as a dep"
    assert not repo.dvcignore.is_ignored(repo.fs, str(REPO / "cts/cli/common.py"))


def test_every_committed_output_has_the_hash_dvc_lock_records():
    """The committed metrics and plots are the outputs dvc.lock describes: a `dvc commit -f`
    in a clone whose workspace held other outputs (a later check's training) recorded their
    hashes beside the committed files (8ae783c), so `dvc status` and the lock disagreed with
    the figures the docs quote."""
    import hashlib

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    tracked = set(
        subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    checked = {}
    for name, stage in lock["stages"].items():
        for out in stage.get("outs", []):
            if out["path"] in tracked:
                digest = hashlib.md5((REPO / out["path"]).read_bytes()).hexdigest()
                checked[out["path"]] = (digest, out["md5"], name)
    assert {"metrics/train.json", "plots/k_sweep.png"} <= set(checked)
    wrong = {path: stage for path, (digest, md5, stage) in checked.items() if digest != md5}
    assert not wrong, f"committed outputs that dvc.lock hashes otherwise: {wrong}"
