"""The Segmenter as an MLflow pyfunc model: uint8 RGB batches in, int64 label maps out. The labels
are computed as ``cts predict`` computes them (:class:`cts.predict.Predictor`: the image
resized and windowed with the sizes the checkpoint was evaluated with, the checkpoint's K or
threshold, upsampled back to the input size; a checkpoint that stores no evaluation sizes uses
the crop's and says so once on stderr when loaded). The checkpoint travels inside the MLflow
model as an artifact and the ``cts`` package as its code (``code/cts``), with the third-party
packages that code imports pinned to the versions installed when it was logged, so ``mlflow
models serve -m models:/cts-segmenter/latest`` needs nothing else, whatever the env manager:
``cts`` is not a requirement (on PyPI that name is another project).

A request may set ``num_tokens_shared`` (a fixed K) or ``share_threshold`` (K per image) in
its ``params``; left out, the model's own setting holds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

CHECKPOINT_ARTIFACT = "checkpoint"
# The distributions of what the model's code imports (cts.serving, cts.predict,
# cts.checkpoint and their imports: torch, timm and its hub, numpy, cv2, PIL, yaml, pandas,
# rich); mlflow adds itself. tests/test_serving.py checks them against a load of the logged
# model.
REQUIREMENTS = (
    "torch",
    "timm",
    "huggingface-hub",
    "numpy",
    "opencv-python-headless",
    "pillow",
    "pyyaml",
    "pandas",
    "rich",
)

# Batches of (H, W, 3) uint8 RGB images of any size -> (H, W) class ids. MLflow's serving
# enforces this schema: a request of another rank or channel count is answered with 400.
# Its params default to None: the checkpoint's own sharing setting.
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]),
    params=ParamSchema(
        [ParamSpec("num_tokens_shared", "long", None), ParamSpec("share_threshold", "double", None)]
    ),
)


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`cts.predict.Predictor` and a cts checkpoint."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from cts.engine import resolve_device
        from cts.predict import load_predictor

        device = resolve_device("auto")
        self.predictor = load_predictor(context.artifacts[CHECKPOINT_ARTIFACT], device)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 -> ``(B, H, W)`` int64, image by image as ``cts predict``,
        with ``params``' K or threshold (:meth:`cts.predict.Predictor.with_sharing`).

        MLflow has already enforced :data:`SIGNATURE` on ``model_input`` and ``params``.
        """
        params = params or {}
        predictor = self.predictor.with_sharing(
            params.get("num_tokens_shared"), params.get("share_threshold")
        )
        return np.stack([predictor.labels(image) for image in model_input]).astype(np.int64)


def pip_requirements() -> list[str]:
    """:data:`REQUIREMENTS` pinned to the versions installed here; a local version tag
    (torch's ``+cu130``) is dropped, as no package index serves it."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


@contextmanager
def _code_copy() -> Iterator[str]:
    """A copy of the ``cts`` package without bytecode, for the model's ``code_paths``."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "cts"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(Path(__file__).resolve().parent, target, ignore=ignore)
        yield str(target)


def log_model_to_run(
    run_id: str,
    checkpoint: str | os.PathLike,
    registered_model_name: str | None = None,
    name: str = "model",
) -> mlflow.models.model.ModelInfo:
    """The pyfunc model logged on run ``run_id``, active or not, in the run's experiment.

    The run's experiment is given explicitly: without an active run, MLflow would put the
    model in the default experiment. The input example is one small grey image, so logging
    stays cheap. A stage logs its model through :func:`cts.tracking.log_model`, which keeps it
    for later while the tracking server does not answer.
    """
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params
    )
    example = np.full((1, 64, 64, 3), 128, dtype=np.uint8)
    with _code_copy() as code:
        return Model.log(
            artifact_path=None,  # deprecated for `name`, still a required argument
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=SegmenterModel(),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[code],
            signature=SIGNATURE,
            input_example=example,
            registered_model_name=registered_model_name,
            pip_requirements=pip_requirements(),
        )
