"""Names: of params and metrics (nested keys flattened with '.'), of a pipeline execution
(the key its stages find their parent run by) and of its parent run."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Short names of params in run names.
_ALIASES = {"num_tokens_shared": "K"}


@dataclass(frozen=True)
class PipelineContext:
    """What the orchestrator that runs a stage knows of the pipeline execution, as plain
    values; each may be left out.

    root: the repository: the folder of the default store and of the spool, and the git
        commit that keys and tags the parent (None: the working directory).
    name: the orchestrator's name of this execution (an experiment's, a pipeline job's):
        it keys the parent and names it; None: the commit and a hash of the params do.
    committed_params: the params the execution started from (the committed params file):
        the parent's name lists what differs from them.
    """

    root: Path | None = None
    name: str | None = None
    committed_params: Mapping[str, Any] | None = None

    @property
    def folder(self) -> Path:
        """The repository root, resolved."""
        return (self.root or Path.cwd()).resolve()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level, keys joined with '.'."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metrics dict, keys joined with '.' after `prefix`;
    lists, strings and booleans are not metrics."""
    return {
        f"{prefix}{key}": float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def git_head(root: Path) -> str | None:
    """The commit checked out at `root`; None outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def pipeline_key(
    params: Mapping[str, Any], root: Path | None = None, name: str | None = None
) -> str:
    """`name` (the orchestrator's name of the execution) when given, else
    `<git HEAD of root>-<params hash>`: a rerun after a params change gets a new parent."""
    if name:
        return name
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    head = git_head((root or Path.cwd()).resolve())
    return f"{(head or 'nogit')[:12]}-{digest.hexdigest()[:12]}"


def _same(value: Any, other: Any) -> bool:
    """Equal, or the same number written two ways (YAML reads `1e-3` as a string)."""
    if value == other:
        return True
    try:
        return float(value) == float(other)
    except (TypeError, ValueError):
        return False


def _short(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else f"{text[:23]}…"


def changed_params(params: Mapping[str, Any], committed: Mapping[str, Any]) -> list[str]:
    """`key=value` for each param that differs from `committed`, in the order of `params`
    (num_tokens_shared as K)."""
    return [
        f"{_ALIASES.get(key, key)}={_short(value)}"
        for key, value in params.items()
        if key not in committed or not _same(value, committed[key])
    ]


def parent_run_name(
    params: Mapping[str, Any],
    key: str,
    committed: Mapping[str, Any] | None = None,
    named: bool = False,
) -> str:
    """With a key the orchestrator `named` (an experiment's name): the key and the params
    that differ from `committed` (``dusky-sick K=0``); otherwise backbone, depth, K, short
    commit and params digest (``vit_tiny_patch16_384 d4 K=103 21da977-77fd33``) and the
    other differing params. At most four are listed, then how many more."""
    changes = changed_params(params, committed) if committed is not None else []
    if named:
        name = key
    else:
        backbone = params.get("backbone", "model")
        depth = f" d{params['depth']}" if params.get("depth") else ""
        k = 0 if params.get("policy") == "none" else params.get("num_tokens_shared", "?")
        commit, _, digest = key.partition("-")
        name = f"{backbone}{depth} K={k} {commit[:7]}-{digest[:6]}"
        shown = ("K=", "backbone=", "depth=", "policy=")
        changes = [change for change in changes if not change.startswith(shown)]
    if len(changes) > 4:
        changes = [*changes[:4], f"+{len(changes) - 4} more"]
    return " ".join([name, *changes])
