"""Fused drop-ins for torch.optim: each step is one kernel per device and dtype that can also zero the
gradients it consumed. Kernels: csrc/cpu/optimizer_kernels.h and csrc/cuda/optimizers.cu; Adam8bit,
AdamW8bit, SGD8bit and RMSprop8bit keep 8-bit blockwise state (csrc/include/fused_train/quant_math.h)."""

from ._state8bit import dequantize_state_dict
from .adam import Adam, AdamW
from .adam8bit import Adam8bit, AdamW8bit
from .in_backward import OptimizerInBackward
from .rmsprop import RMSprop, RMSProp, RMSprop8bit
from .sgd import SGD, SGD8bit

__all__ = ["SGD", "Adam", "AdamW", "Adam8bit", "AdamW8bit", "SGD8bit", "RMSprop", "RMSProp", "RMSprop8bit",
           "OptimizerInBackward", "dequantize_state_dict"]
