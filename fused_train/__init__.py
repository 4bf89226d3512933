"""fused_train: fused C++/CUDA kernels for the standard PyTorch training loop.

``fused_train.optim`` holds SGD, Adam, AdamW and RMSprop whose step kernels also zero the gradients;
``fused_train.nn`` holds a one-pass cross-entropy. Both are drop-ins for their torch counterparts.
"""

import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers the torch.ops.fused_train ops)
from . import _ops  # noqa: F401  (fake kernels for torch.compile)
from . import nn, optim
from ._build_info import build_info

__all__ = ["build_info", "nn", "optim"]
__version__ = "0.1.0"
