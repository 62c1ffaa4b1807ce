"""Content-aware Token Sharing (CTS) for Segmenter: library."""

from cts.processes import bound_openmp_spinning

# Before anything imports torch (cts._compat does): OpenMP reads its wait policy only once.
bound_openmp_spinning()

from cts._compat import patch_torchvision_if_ops_unloadable  # noqa: E402

patch_torchvision_if_ops_unloadable()

__version__ = "0.1.0"


def load_model(path, device="cpu", num_tokens_shared=None, policy=None, trust=False):
    """A Segmenter in eval mode from a checkpoint: cts's own, or an original rstrudel/segmenter
    or tue-mps/cts-segmenter ``checkpoint.pth`` (its folder, or its ``variant.yml``), imported.

    ``model(images)`` on normalised ``(B, 3, H, W)`` float images returns a ``SegmenterOutput``
    (logits, shared, num_tokens). ``num_tokens_shared`` overrides K; ``policy`` (imports only)
    one of none | policy_net | random | oracle. Imported lazily: ``import cts`` stays light.

    Checkpoints are read as tensors and plain values only; one that holds other Python
    objects is refused unless ``trust=True``, which unpickles it and so can run any code
    it contains: use it only for files from a source you trust.
    """
    from cts.import_checkpoint import load_model as _load_model

    return _load_model(
        path, device=device, num_tokens_shared=num_tokens_shared, policy=policy, trust=trust
    )
