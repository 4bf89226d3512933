"""Plain-PyTorch references the tests compare fused_train against.

Optimizers: torch.optim itself is the reference for fp32/fp64 params. For bf16/fp16 params fused_train does
the math in fp32 with fp32 state and rounds the param once per step, which torch.optim does not (it keeps
state in the param's dtype and rounds after every op); :class:`LowPrecisionOptimizerReference` reproduces
fused_train's contract with torch.optim running on fp32 copies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class LowPrecisionOptimizerReference:
    """Steps low-precision params the way fused_train's kernels do, using a torch.optim optimizer in fp32.

    Each step: widen the params and grads to fp32, step ``optimizer_cls`` (whose state therefore stays fp32)
    on the widened copies, and round the result into the low-precision params once.

    Args:
        params (list of Tensor): the bf16/fp16 params (with ``.grad`` set before each :meth:`step`).
        optimizer_cls: a torch.optim class, e.g. ``torch.optim.Adam``.
        **kwargs: its arguments.
    """

    def __init__(self, params: list[Tensor], optimizer_cls: type, **kwargs: Any) -> None:
        self.params = list(params)
        self.widened = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.optimizer = optimizer_cls(self.widened, **kwargs)

    @torch.no_grad()
    def step(self) -> None:
        for p, w in zip(self.params, self.widened):
            w.copy_(p.float())
            w.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, w in zip(self.params, self.widened):
            p.copy_(w)  # the single rounding to the param's dtype
