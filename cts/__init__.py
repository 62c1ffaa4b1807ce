"""Content-aware Token Sharing (CTS) for Segmenter: library."""

from cts._compat import patch_torchvision_if_ops_unloadable

patch_torchvision_if_ops_unloadable()

__version__ = "0.1.0"
