"""Import-time workaround for a CPU-only torch next to a CUDA build of torchvision.

timm imports torchvision, whose PyPI wheel for Linux links its C++ ops against CUDA
libraries. With a CPU build of torch those ops cannot load, and torchvision's fake-tensor
registrations for them then fail at import. cts uses none of those ops, so when the
library cannot load we skip only that registration module; everything timm needs
(layers, transforms) imports normally.

Needed only where scripts/install.sh takes its second path (a local CPU torch wheel and
no coherent torch/torchvision pair on disk: PyPI has no CPU torchvision, and its CUDA pair
is several GB). Where the pair is coherent the library loads and this does nothing.
"""

import glob
import importlib.util
import os
import sys
import types


def patch_torchvision_if_ops_unloadable() -> None:
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    if not libraries:
        return
    import torch

    try:
        torch.ops.load_library(libraries[0])
    except OSError:
        name = "torchvision._meta_registrations"
        sys.modules.setdefault(name, types.ModuleType(name))
