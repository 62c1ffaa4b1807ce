"""Every third-party module the code imports comes from a distribution pyproject.toml declares.

Without it a package that arrives only through another one (numpy through torch, Pillow
through matplotlib) disappears the day that one drops it, and `pip install .` installs a
`cts` that cannot import. The imports are derived from the code, not kept by hand: every
import statement of cts/ and stages/, module-level and inside functions, its top-level name
mapped to the installed distributions that provide it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from helpers import PACKAGE_FOLDERS, REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; 3.10 has no TOML reader

# Extras and the files that may import what only they declare (each import guarded with a
# message naming the extra): the rest of the code must run without them.
EXTRA_USERS = {"cluster": {"stages/kfp_pipeline.py"}}


def _canonical(name: str) -> str:
    """PEP 503 normalised distribution name: ``PyYAML`` -> ``pyyaml``, ``hydra_core`` ->
    ``hydra-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    """``"torch>=2.4"`` -> ``"torch"`` (extras, markers and bounds dropped)."""
    return _canonical(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0))


def declared() -> dict[str, set[str]]:
    """Declared distributions by where: ``""`` for `dependencies`, else the extra's name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    return {where: {_requirement_name(r) for r in reqs} for where, reqs in groups.items()}


def third_party_imports(files: list[Path]) -> dict[str, set[str]]:
    """Top-level names of the non-stdlib, non-project modules imported anywhere in
    ``files`` (module-level and function-level), each with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top not in sys.stdlib_module_names and top not in PACKAGE_FOLDERS:
                    found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def undeclared(imports: dict[str, set[str]], groups: dict[str, set[str]]) -> list[str]:
    """One line per import whose distribution is not declared where its files may use it."""
    providers = importlib.metadata.packages_distributions()
    problems = []
    for top, files in sorted(imports.items()):
        dists = {_canonical(d) for d in providers.get(top, ())}
        if not dists:
            problems.append(f"{top} (imported by {sorted(files)}): no installed distribution")
            continue
        if dists & groups[""]:
            continue
        extras = [extra for extra, names in groups.items() if extra and dists & names]
        allowed = set().union(*(EXTRA_USERS.get(extra, set()) for extra in extras))
        if not extras or files - allowed:
            where = f"extra {extras} only" if extras else "not declared"
            problems.append(f"{top} ({', '.join(sorted(dists))}; {where}): {sorted(files)}")
    return problems


def _code_files() -> list[Path]:
    return sorted(
        path for folder in PACKAGE_FOLDERS.values() for path in (REPO / folder).rglob("*.py")
    )


def test_every_imported_distribution_is_declared():
    problems = undeclared(third_party_imports(_code_files()), declared())
    assert not problems, "imported but not declared in pyproject.toml:\n" + "\n".join(problems)


def test_the_check_sees_function_level_imports_and_undeclared_or_misplaced_extras():
    """A lazily imported package is seen (huggingface_hub is imported only inside
    functions); an undeclared one is reported, and so is an extra's package imported
    outside the files that extra guards."""
    assert "huggingface_hub" in third_party_imports([REPO / "cts/models/pretrained.py"])
    groups = {"": {"torch"}, "cluster": {"kfp"}}
    problems = undeclared({"PIL": {"cts/data/io.py"}, "kfp": {"cts/cli/kfp.py"}}, groups)
    assert len(problems) == 2, problems
    assert problems[0].startswith("PIL (pillow; not declared)")
    assert problems[1].startswith("kfp (") and "extra ['cluster'] only" in problems[1]
    assert undeclared({"kfp": {"stages/kfp_pipeline.py"}}, groups) == []
