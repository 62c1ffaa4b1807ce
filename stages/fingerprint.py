"""Settings fingerprint: a resume checkpoint is only reused by a run with the same settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from cts_stages.launch import LAUNCH_PARAMS

# Settings that do not change what is computed.
_IRRELEVANT = {
    "num_workers",
    "mlflow_tracking_uri",
    "mlflow_registered_model",
    "checkpoint_every",
    "eval_every",
    # The batch is global and every process count sees the same samples in the same batches.
    *LAUNCH_PARAMS,
}


def fingerprint(params: dict[str, Any], keys: Iterable[str]) -> str:
    relevant = {key: params[key] for key in sorted(keys) if key not in _IRRELEVANT}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
