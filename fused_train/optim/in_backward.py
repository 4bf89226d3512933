"""Optimizer-in-backward: step each param the moment its gradient is complete, then free that gradient.

A standard loop holds every gradient at once between ``backward()`` and ``step()``; this holds one
layer's worth at a time. Built on ``Tensor.register_post_accumulate_grad_hook`` (torch ≥ 2.1).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ._base import FusedOptimizer


class OptimizerInBackward:
    """Runs a fused_train (or any torch.optim) optimizer per param inside ``backward()``.

    Each param that requires grad gets its own optimizer; when autograd finishes accumulating the param's
    gradient, its optimizer steps and the gradient is freed. The training loop then calls only
    ``loss.backward()`` — no ``step()``, no ``zero_grad()``.

    Not for gradient accumulation over several backward calls (every backward steps), nor for gradient
    clipping by global norm (no moment holds all gradients).

    Args:
        params (iterable of Tensor): the params to optimize (e.g. ``model.parameters()``).
        optimizer_cls: e.g. ``fused_train.optim.AdamW``.
        **kwargs: the optimizer's arguments, the same for every param.

    Example:
        >>> stepper = OptimizerInBackward(model.parameters(), fused_train.optim.AdamW, lr=1e-3)
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward()   # params are updated during this call
    """

    def __init__(self, params: Iterable[Tensor], optimizer_cls: type, **kwargs: Any) -> None:
        self.optimizers: dict[Tensor, torch.optim.Optimizer] = {}
        self._handles = []
        for p in params:
            if not p.requires_grad:
                continue
            optimizer = self.optimizers[p] = optimizer_cls([p], **kwargs)
            if isinstance(optimizer, FusedOptimizer):
                # each param its own stochastic-rounding seed, as if all were in one optimizer
                optimizer._rounding_position_base = len(self.optimizers) - 1
            self._handles.append(p.register_post_accumulate_grad_hook(self._step_param))
        if not self.optimizers:
            raise ValueError("OptimizerInBackward: got no params that require grad")

    def _step_param(self, param: Tensor) -> None:
        try:
            self.optimizers[param].step()
        except Exception:
            # The backward stops here (e.g. CUDA's IndexError for an earlier bad target): the grads accumulated
            # so far belong to a batch that will not be stepped, and with no zero_grad in this loop the next
            # backward would add to them.
            for p in self.optimizers:
                p.grad = None
            raise
        param.grad = None

    def state_dict(self) -> list[dict[str, Any]]:
        """One torch.optim-format state dict per param, in param order."""
        return [opt.state_dict() for opt in self.optimizers.values()]

    def load_state_dict(self, state_dicts: list[dict[str, Any]]) -> None:
        if len(state_dicts) != len(self.optimizers):
            raise ValueError(
                f"OptimizerInBackward.load_state_dict: got {len(state_dicts)} state dicts for "
                f"{len(self.optimizers)} params"
            )
        for opt, sd in zip(self.optimizers.values(), state_dicts):
            opt.load_state_dict(sd)

    def remove(self) -> None:
        """Detaches the hooks: backward stops stepping."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
