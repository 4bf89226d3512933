"""RMSprop (plain, centered, with momentum) in one fused kernel per device and dtype; math: ``rmsprop_update``
in csrc/include/fused_train/optim_math.h. torch has no fused RMSprop; this is the first."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .. import _ops
from ._base import FusedOptimizer, check_implementation_flags, check_lr, check_stochastic_round
from ._state8bit import State8bit, check_8bit_arguments


def check_rmsprop_arguments(name: str, lr: float | Tensor, alpha: float, eps: float, weight_decay: float,
                            momentum: float, bf16_stochastic_round: Any) -> None:
    """torch.optim.RMSprop's argument checks, same messages."""
    check_lr(lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= momentum:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= alpha:
        raise ValueError(f"Invalid alpha value: {alpha}")
    check_stochastic_round(name, bf16_stochastic_round)


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
        bf16_stochastic_round (bool, optional): see :class:`fused_train.optim.Adam` (default: False).

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
        bf16_stochastic_round: bool = False,
    ) -> None:
        check_rmsprop_arguments(type(self).__name__, lr, alpha, eps, weight_decay, momentum, bf16_stochastic_round)
        check_implementation_flags("RMSprop", foreach, None, differentiable)
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
            bf16_stochastic_round=bf16_stochastic_round,
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
            found_inf=found_inf, rounding_seeds=bucket.rounding_seeds, rounding_offsets=bucket.rounding_offsets,
        )


RMSProp = RMSprop


class RMSprop8bit(State8bit, FusedOptimizer, torch.optim.Optimizer):
    r"""RMSprop with 8-bit blockwise state, a drop-in for ``bitsandbytes.optim.RMSprop8bit``.

    The step is :class:`torch.optim.RMSprop`'s in fp32, on the dequantized state: ``square_avg`` (unsigned code) and
    ``momentum_buffer`` when ``momentum > 0`` (signed code), each one uint8 code per element and one fp32 absmax per
    256 elements (1.02 bytes per param and state, instead of 4). The param is updated from the fp32 state before it
    is requantized. Params under ``min_8bit_size`` elements, float64, complex, and DTensor params whose shards would
    cut a block (see :class:`Adam8bit`) keep fp32 (float64) state and take :class:`fused_train.optim.RMSprop`'s
    kernel.

    ``centered=True`` raises, as in bitsandbytes: the centered variance ``square_avg - grad_avg²`` is smaller than the
    8-bit codes' error wherever the gradient's mean dominates its noise, and goes negative there (NaN). Unlike
    bitsandbytes, ``alpha=0`` works and ``momentum`` is torch's; the square average uses the unsigned code
    (bitsandbytes quantizes it with the signed one, so half its codes go unused).

    ``state_dict()`` holds ``<name>_codes`` and ``<name>_absmax`` for quantized params and a ``step``; checkpoints
    convert both ways as :class:`Adam8bit`'s do (torch.optim.RMSprop's loads here quantized; this one
    loads into fused_train.optim.RMSprop dequantized, and into torch.optim.RMSprop after
    :func:`fused_train.optim.dequantize_state_dict`).

    Args:
        params (iterable): params or param groups to optimize.
        lr, alpha, eps, weight_decay, momentum: as torch.optim.RMSprop (defaults 1e-2, 0.99, 1e-8, 0, 0).
        centered (bool): must be False (see above).
        args: bitsandbytes' override object; must be None.
        min_8bit_size (int): params with fewer elements keep fp32 state (default: 4096, as bitsandbytes).
        maximize, zero_grad_in_step, bf16_stochastic_round: as :class:`fused_train.optim.RMSprop`.

    Example:
        >>> optimizer = fused_train.optim.RMSprop8bit(model.parameters(), lr=1e-3, momentum=0.9)
    """

    _state_names = ("square_avg", "momentum_buffer", "square_avg_codes", "square_avg_absmax", "momentum_buffer_codes",
                    "momentum_buffer_absmax")
    _full_precision_state_names = ("square_avg", "momentum_buffer")
    _moments = ("square_avg", "momentum_buffer")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        args: Any = None,
        min_8bit_size: int = 4096,
        *,
        maximize: bool = False,
        zero_grad_in_step: bool | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        name = type(self).__name__
        check_rmsprop_arguments(name, lr, alpha, eps, weight_decay, momentum, bf16_stochastic_round)
        check_8bit_arguments(name, min_8bit_size=min_8bit_size, args=args)
        if centered:
            raise ValueError(_CENTERED_8BIT.format(name=name, where="centered=True"))
        # torch.optim.RMSprop's group keys as well, so a checkpoint loads into fused_train.optim.RMSprop unchanged.
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=False, foreach=None, maximize=maximize, differentiable=False, min_8bit_size=min_8bit_size,
            bf16_stochastic_round=bf16_stochastic_round,
        )
        super().__init__(params, defaults, zero_grad_in_step=zero_grad_in_step)

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = self._new_step_tensor(param)
        self._new_moment(param, group, state, "square_avg")

    def _ensure_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        # Checked while the tables are built, before any group steps.
        if group.get("centered"):
            raise ValueError(_CENTERED_8BIT.format(
                name=type(self).__name__, where="a group with centered=True (e.g. from a loaded checkpoint; set the "
                "group's 'centered' to False to go on uncentered)"))
        if group["momentum"] > 0 and not self._has_moment(state, "momentum_buffer"):
            self._new_moment(param, group, state, "momentum_buffer")

    def _moments_in_use(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("square_avg", "momentum_buffer") if group["momentum"] > 0 else ("square_avg",)

    def _state_options(self, group: dict[str, Any]) -> tuple:
        return RMSprop._state_options(self, group) + (group.get("min_8bit_size"),)

    def _convert_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        super()._convert_state(p, group, state)
        state.pop("grad_avg", None)  # a centered checkpoint's, once its group was set uncentered

    def _step_bucket(self, group, bucket, params, grads, states, steps, *, zero_grad, lr, lr_tensor,
                     grad_scale, found_inf) -> None:
        momentum = float(group["momentum"])
        hyper = dict(lr=lr, alpha=float(group["alpha"]), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), momentum=momentum, maximize=group["maximize"],
                     zero_grad=zero_grad, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                     rounding_seeds=bucket.rounding_seeds, rounding_offsets=bucket.rounding_offsets)
        if not self._is_quantized(states):
            buffers = states["momentum_buffer"] if momentum > 0 else []
            _ops.rmsprop_step_(params, grads, states["square_avg"], [], buffers, steps, centered=False, **hyper)
            return
        buffers = (states["momentum_buffer_codes"], states["momentum_buffer_absmax"]) if momentum > 0 else ([], [])
        _ops.rmsprop8bit_step_(params, grads, states["square_avg_codes"], states["square_avg_absmax"], *buffers, steps,
                               **hyper)


_CENTERED_8BIT = ("{name}: {where} is not supported with 8-bit state (nor by bitsandbytes): the centered variance "
                  "square_avg - grad_avg² falls below the 8-bit codes' error wherever the gradient's mean dominates "
                  "its noise; use fused_train.optim.RMSprop for centered RMSprop")
