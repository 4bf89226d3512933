"""RMSprop (plain, centered, with momentum) in one fused kernel per device and dtype; math: ``rmsprop_update``
in csrc/include/fused_train/optim_math.h. torch has no fused RMSprop; this is the first."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .. import _ops
from ._base import FusedOptimizer, check_implementation_flags, check_lr


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    r"""RMSprop as :class:`torch.optim.RMSprop`, in one fused kernel per device and dtype.

    Same arguments, defaults, validation and ``state_dict`` format (``step``, ``square_avg``,
    ``momentum_buffer`` when ``momentum > 0``, ``grad_avg`` when ``centered``) as ``torch.optim.RMSprop``.
    State is fp32 for bf16/fp16 params.

    Args:
        params (iterable): params or param groups to optimize.
        lr (float or Tensor, optional): learning rate (default: 1e-2).
        alpha (float, optional): smoothing constant (default: 0.99).
        eps (float, optional): added to the denominator for numerical stability (default: 1e-8).
        weight_decay (float, optional): L2 penalty (default: 0).
        momentum (float, optional): momentum factor (default: 0).
        centered (bool, optional): normalize by an estimate of the gradient's variance (default: False).
        capturable (bool, optional): accepted; see :class:`fused_train.optim.Adam` (default: False).
        foreach, differentiable: see :class:`fused_train.optim.Adam`.
        maximize (bool, optional): maximize the objective (default: False).
        zero_grad_in_step (bool or None, optional): see :class:`fused_train.optim.Adam`.

    Example:
        >>> optimizer = fused_train.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9)
    """

    _state_names = ("square_avg", "grad_avg", "momentum_buffer")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        zero_grad_in_step: bool | None = None,
    ) -> None:
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        check_implementation_flags("RMSprop", foreach, None, differentiable)
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
        )
        super().__init__(params, defaults, zero_grad_in_step=zero_grad_in_step)

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = self._new_step_tensor(param)
        state["square_avg"] = self._zeros_state(param)

    def _ensure_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = self._zeros_state(param)
        if group["centered"] and "grad_avg" not in state:
            state["grad_avg"] = self._zeros_state(param)

    def _state_options(self, group: dict[str, Any]) -> tuple:
        momentum = True if group["momentum"] > 0 else False  # a branch: see SGD._state_options
        return (momentum, bool(group["centered"]))

    def _step_bucket(self, group, bucket, params, grads, states, steps, *, zero_grad, lr, lr_tensor,
                     grad_scale, found_inf) -> None:
        centered, momentum = group["centered"], float(group["momentum"])
        grad_avgs = states["grad_avg"] if centered else []
        buffers = states["momentum_buffer"] if momentum > 0 else []
        _ops.rmsprop_step_(
            params, grads, states["square_avg"], grad_avgs, buffers, steps,
            lr=lr, alpha=float(group["alpha"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), momentum=momentum, centered=centered,
            maximize=group["maximize"], zero_grad=zero_grad, lr_tensor=lr_tensor, grad_scale=grad_scale,
            found_inf=found_inf,
        )


RMSProp = RMSprop
