"""Fused drop-ins for torch.optim: each step is one kernel per device and dtype that can also zero the
gradients it consumed. Kernels: csrc/cpu/optimizer_kernels.h and csrc/cuda/optimizers.cu; Adam8bit and
AdamW8bit keep 8-bit blockwise state (csrc/include/fused_train/quant_math.h)."""

from .adam import Adam, AdamW
from .adam8bit import Adam8bit, AdamW8bit, dequantize_state_dict
from .in_backward import OptimizerInBackward
from .rmsprop import RMSprop, RMSProp
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adam8bit", "AdamW8bit", "RMSprop", "RMSProp", "OptimizerInBackward",
           "dequantize_state_dict"]
