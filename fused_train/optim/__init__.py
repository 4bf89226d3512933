"""Fused drop-ins for torch.optim: each step is one kernel per device and dtype that can also zero the
gradients it consumed. Kernels: csrc/cpu/optimizer_kernels.h and csrc/cuda/optimizers.cu."""

from .adam import Adam, AdamW
from .in_backward import OptimizerInBackward
from .rmsprop import RMSprop, RMSProp
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "RMSProp", "OptimizerInBackward"]
