"""fused_train: fused C++/CUDA kernels for the standard PyTorch training loop.

``fused_train.optim`` holds SGD, Adam, AdamW and RMSprop whose step kernels also zero the gradients;
``fused_train.nn`` holds a one-pass cross-entropy. Both are drop-ins for their torch counterparts.
"""

import torch  # loads libtorch before our extension

from . import _torch_version_check


def _load_compiled_kernels():
    """Imports _C, which registers the torch.ops.fused_train ops; a torch other than the one _C was built
    against, or a failed load, raises an ImportError naming both torch versions and the rebuild command."""
    try:
        from ._built_against import TORCH_VERSION as built  # written by setup.py
    except ImportError:  # built by something that records nothing (an older setup.py)
        built = None
    check = _torch_version_check
    rebuild = check.rebuild_command(__path__[0])
    mismatch = check.torch_mismatch_message(built, torch.__version__, rebuild)
    if mismatch is not None:
        raise ImportError(mismatch)
    try:
        from . import _C  # noqa: F401
    except (ImportError, OSError) as error:
        reason = check.load_error_reason(error, __path__[0])
        raise ImportError(check.load_failure_message(built, torch.__version__, reason, rebuild)) from error


_load_compiled_kernels()

from . import (
    _ops,  # noqa: F401  (fake kernels for torch.compile)
    nn,
    optim,
)
from ._build_info import build_info
from ._ops import empty_cache

__all__ = ["build_info", "empty_cache", "nn", "optim"]
__version__ = "0.1.0"
