"""What `pip install` puts on the import path: the library `cts` and the pipeline layer as
`cts_stages` (from the repository's stages/ folder), never a generic top-level `stages`,
which a DVC project's own stages/ folder would shadow or be shadowed by."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import PACKAGE_FOLDERS, REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _python(code: str, cwd: Path) -> str:
    """``code`` in a fresh interpreter in ``cwd``, without PYTHONPATH: what an installed
    `cts` sees there. Returns its stdout."""
    env = {"PATH": str(Path(sys.executable).parent)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_pyproject_installs_every_package_folder_and_stages_as_cts_stages():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: folder.replace("/", ".") for name, folder in PACKAGE_FOLDERS.items()}
    assert setuptools["package-dir"] == {"cts_stages": "stages"}
    on_disk = {
        ".".join([name, *init.parent.relative_to(REPO / folder).parts])
        for name, folder in folders.items()
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(on_disk)


def test_stages_is_not_an_installed_name_but_cts_stages_is(tmp_path):
    found = _python(
        """
        from importlib.util import find_spec
        print(find_spec("stages"), find_spec("cts_stages") is not None)
        """,
        tmp_path,
    )
    assert found == "None True"


def test_a_checkout_runs_its_own_stages_and_a_foreign_stages_folder_is_left_alone(tmp_path):
    """`cts` in a copy of the checkout (a DVC experiment's temp folder) runs the copy's
    stages; in a DVC project with its own stages/ folder, the installed ones."""
    copy, project = tmp_path / "copy", tmp_path / "project"
    for folder in ("cts", "stages"):
        shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "stages").mkdir(parents=True)
    (project / "stages" / "__init__.py").write_text("raise SystemExit('foreign stages ran')\n")
    code = """
        from pathlib import Path
        from cts.cli.common import use_checkout_stages
        use_checkout_stages(Path.cwd())
        import cts_stages.launch
        print(Path(cts_stages.launch.__file__).resolve())
        """
    assert _python(code, copy) == str((copy / "stages" / "launch.py").resolve())
    installed = Path(_python(code, project))
    assert installed.parent.name == "stages" and not installed.is_relative_to(tmp_path)


@pytest.mark.parametrize("name", ["mlflow", "timm", "typer", "yaml"])
def test_installed_dependencies_carry_their_bytecode(name):
    # Every `cts` process imports these; where Python may not write .pyc files (read-only
    # site-packages, PYTHONDONTWRITEBYTECODE) it would compile them again on each start.
    import importlib
    import importlib.util

    source = importlib.import_module(name).__file__
    assert Path(importlib.util.cache_from_source(source)).is_file(), f"{name}: no bytecode"
