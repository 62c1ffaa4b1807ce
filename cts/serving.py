"""The Segmenter as an MLflow pyfunc model: uint8 RGB batches in, int64 label maps out.

The labels are computed as ``cts predict`` computes them (:class:`cts.predict.Predictor`:
the image resized to the crop's short side, sliding windows of the crop, the checkpoint's K,
upsampled back to the input size). The checkpoint travels inside the MLflow model as an
artifact, so ``mlflow models serve -m models:/cts-segmenter/latest`` needs nothing else.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

CHECKPOINT_ARTIFACT = "checkpoint"

# Batches of (H, W, 3) uint8 RGB images of any size -> (H, W) class ids. MLflow's serving
# enforces this schema: a request of another rank or channel count is answered with 400.
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]),
)


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`cts.predict.Predictor` and a cts checkpoint."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from cts.checkpoint import load_segmenter
        from cts.engine import resolve_device
        from cts.predict import Predictor

        device = resolve_device("auto")
        model = load_segmenter(context.artifacts[CHECKPOINT_ARTIFACT], device)
        self.predictor = Predictor(model, device)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 -> ``(B, H, W)`` int64, image by image as ``cts predict``.

        MLflow has already enforced :data:`SIGNATURE` on ``model_input``.
        """
        return np.stack([self.predictor.labels(image) for image in model_input])


def log_segmenter_model(
    checkpoint: str | os.PathLike,
    registered_model_name: str | None = None,
    name: str = "model",
) -> mlflow.models.model.ModelInfo:
    """Log the checkpoint as a pyfunc model on the active run (and register it when named).

    The input example is one small grey image, so logging stays cheap.
    """
    example = np.full((1, 64, 64, 3), 128, dtype=np.uint8)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=SegmenterModel(),
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
        signature=SIGNATURE,
        input_example=example,
        registered_model_name=registered_model_name,
        pip_requirements=["torch", "timm", "cts"],
    )
