"""SGD with momentum, dampening, Nesterov and weight decay in one fused kernel per device and dtype; math:
``sgd_update`` in csrc/include/fused_train/optim_math.h."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .. import _ops
from ._base import FusedOptimizer, check_implementation_flags, check_lr, check_stochastic_round
from ._state8bit import State8bit, check_8bit_arguments


def check_sgd_arguments(name: str, lr: float | Tensor, momentum: float, dampening: float, weight_decay: float,
                        nesterov: bool, bf16_stochastic_round: Any) -> None:
    """torch.optim.SGD's argument checks, same messages."""
    check_lr(lr)
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    check_stochastic_round(name, bf16_stochastic_round)


class SGD(FusedOptimizer, torch.optim.SGD):
    r"""Stochastic gradient descent as :class:`torch.optim.SGD`, in one fused kernel per device and dtype.

    Same arguments, defaults, validation and ``state_dict`` format (``momentum_buffer`` when
    ``momentum != 0``) as ``torch.optim.SGD``; the first step copies the gradient into the momentum
    buffer as torch does. State is fp32 for bf16/fp16 params.

    Args:
        params (iterable): params or param groups to optimize.
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        momentum (float, optional): momentum factor (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        weight_decay (float, optional): L2 penalty (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        maximize (bool, optional): maximize the objective (default: False).
        foreach, fused, differentiable: see :class:`fused_train.optim.Adam`.
        zero_grad_in_step (bool or None, optional): see :class:`fused_train.optim.Adam`.
        bf16_stochastic_round (bool, optional): see :class:`fused_train.optim.Adam`; bf16 params then also keep a
            ``step`` in their state, the rounding's counter (default: False).

    Example:
        >>> optimizer = fused_train.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    """

    _state_names = ("momentum_buffer",)
    _has_step = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        zero_grad_in_step: bool | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        check_sgd_arguments("SGD", lr, momentum, dampening, weight_decay, nesterov, bf16_stochastic_round)
        check_implementation_flags("SGD", foreach, fused, differentiable)
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
            bf16_stochastic_round=bf16_stochastic_round,
        )
        self._init_sgd(params, defaults, zero_grad_in_step)

    def _init_sgd(self, params: Any, defaults: dict[str, Any], zero_grad_in_step: bool | None) -> None:
        FusedOptimizer.__init__(self, params, defaults, zero_grad_in_step=zero_grad_in_step)
        # Momentum buffers created but not yet filled by a step (id of the param -> its new buffer): their first
        # real step copies the gradient in (torch's clone), whenever that step comes. Keyed by the param, not
        # the buffer: a traced step cannot take the id of a tensor it created (torch 2.5).
        self._fresh_buffers: dict[int, Tensor] = {}

    def _state_options(self, group: dict[str, Any]) -> tuple:
        # A branch, not the comparison itself: traced, a scheduled momentum is symbolic, and a symbolic bool
        # inside a tuple comparison trips dynamo (torch 2.14); a branch makes it a plain bool.
        return (True,) if group["momentum"] != 0 else (False,)

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        pass  # torch's SGD has no state until a step with momentum creates the buffer

    def _ensure_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            # Filled with the first gradient by the kernel (is_first_step), as torch's clone(grad); also when
            # momentum is switched on after the first step, as torch does.
            buffer = state["momentum_buffer"] = self._zeros_state(param)
            self._fresh_buffers[id(param)] = buffer

    def _momentum_step(self, states: dict[str, list]) -> tuple[str, tuple[list, ...], Callable[..., None]]:
        """A bucket's momentum state: the state key a fresh buffer is recognised by, the lists the op takes (after
        params and grads) and the op."""
        return "momentum_buffer", (states["momentum_buffer"],), _ops.sgd_step_

    def _step_bucket(self, group, bucket, params, grads, states, steps, *, zero_grad, lr, lr_tensor,
                     grad_scale, found_inf) -> None:
        momentum = float(group["momentum"])
        kwargs = dict(
            lr=lr, momentum=momentum, dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]), nesterov=group["nesterov"], maximize=group["maximize"],
            zero_grad=zero_grad, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        )
        seeds = bucket.rounding_seeds  # stochastic rounding: steps are its counters
        rounding = dict(state_steps=steps, rounding_seeds=seeds) if seeds is not None else {}
        if bucket.rounding_offsets is not None:  # (DTensor shards: their offsets)
            rounding["rounding_offsets"] = bucket.rounding_offsets
        if momentum == 0:
            _ops.sgd_step_(params, grads, [], is_first_step=False, **kwargs, **rounding)
            return
        fresh_key, buffers, step_op = self._momentum_step(states)
        fresh_buffers = self._fresh_buffers
        if fresh_buffers:
            # (buffers holds what the kernel sees, a view for complex params: look up the state's own tensor.)
            originals = [self.state[p][fresh_key] for p in bucket.originals]
            fresh = [fresh_buffers.get(id(p)) is b for p, b in zip(bucket.originals, originals)]
        else:
            fresh = None
        if not fresh or not any(fresh):
            step_op(params, grads, *buffers, is_first_step=False, **kwargs, **rounding)
            return
        # A param whose buffer is new takes its first step (buf = grad); the call splits by that.
        for first in (True, False):
            idx = [i for i, f in enumerate(fresh) if f == first]
            if idx:
                part = {key: [values[i] for i in idx] for key, values in rounding.items()}
                step_op([params[i] for i in idx], [grads[i] for i in idx], *[[b[i] for i in idx] for b in buffers],
                        is_first_step=first, **kwargs, **part)
        # A step GradScaler skipped (inf/NaN gradients) left the new buffers unfilled: they stay fresh, so the
        # next real step still copies its gradient in. Knowing that costs one host read of found_inf, only
        # on the steps that create buffers (the first, as a rule), and not while a CUDA graph is captured.
        if found_inf is not None and not _capturing(found_inf) and bool(found_inf.item()):
            return
        for p, f in zip(bucket.originals, fresh):
            if f:
                del fresh_buffers[id(p)]

    @torch._disable_dynamo  # as FusedOptimizer.load_state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._fresh_buffers = {}


class SGD8bit(State8bit, SGD):
    r"""SGD with an 8-bit blockwise momentum buffer, a drop-in for ``bitsandbytes.optim.SGD8bit``.

    The step is :class:`torch.optim.SGD`'s in fp32 (momentum, dampening, Nesterov, weight decay; the first step
    copies the gradient into the buffer), on the dequantized ``momentum_buffer``: one uint8 code per element (signed
    code) and one fp32 absmax per 256 elements, 1.02 bytes per param instead of 4. The param is updated from the
    fp32 buffer before it is requantized. Params under ``min_8bit_size`` elements, float64, complex, and DTensor
    params whose shards would cut a block (see :class:`Adam8bit`) keep an fp32 (float64) buffer and take
    :class:`fused_train.optim.SGD`'s kernel. ``momentum=0`` keeps no
    state and steps as :class:`fused_train.optim.SGD` (bitsandbytes refuses it).

    ``state_dict()`` holds ``momentum_buffer_codes`` and ``momentum_buffer_absmax`` for quantized params; checkpoints
    convert both ways as :class:`Adam8bit`'s do. This class is a :class:`fused_train.optim.SGD` for ``isinstance``,
    but its checkpoints load into torch.optim.SGD only after :func:`fused_train.optim.dequantize_state_dict`.

    Args:
        params (iterable): params or param groups to optimize.
        lr, momentum, dampening, weight_decay, nesterov: as torch.optim.SGD (defaults 1e-3, 0, 0, 0, False).
        args: bitsandbytes' override object; must be None.
        min_8bit_size (int): params with fewer elements keep an fp32 buffer (default: 4096, as bitsandbytes).
        maximize, zero_grad_in_step, bf16_stochastic_round: as :class:`fused_train.optim.SGD`.

    Example:
        >>> optimizer = fused_train.optim.SGD8bit(model.parameters(), lr=0.1, momentum=0.9)
    """

    _state_names = ("momentum_buffer", "momentum_buffer_codes", "momentum_buffer_absmax")
    _full_precision_state_names = ("momentum_buffer",)
    _moments = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        args: Any = None,
        min_8bit_size: int = 4096,
        *,
        maximize: bool = False,
        zero_grad_in_step: bool | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        name = type(self).__name__
        check_sgd_arguments(name, lr, momentum, dampening, weight_decay, nesterov, bf16_stochastic_round)
        check_8bit_arguments(name, min_8bit_size=min_8bit_size, args=args)
        # torch.optim.SGD's group keys as well, so a checkpoint loads into fused_train.optim.SGD unchanged.
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=None, differentiable=False, fused=None, min_8bit_size=min_8bit_size,
            bf16_stochastic_round=bf16_stochastic_round,
        )
        self._init_sgd(params, defaults, zero_grad_in_step)

    def _state_options(self, group: dict[str, Any]) -> tuple:
        return super()._state_options(group) + (group.get("min_8bit_size"),)

    def _moments_in_use(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _ensure_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if group["momentum"] != 0 and not self._has_moment(state, "momentum_buffer"):
            # Filled with the first gradient by the kernel (is_first_step), as SGD's.
            self._new_moment(param, group, state, "momentum_buffer")
            key = "momentum_buffer_codes" if "momentum_buffer_codes" in state else "momentum_buffer"
            self._fresh_buffers[id(param)] = state[key]

    def _momentum_step(self, states: dict[str, list]) -> tuple[str, tuple[list, ...], Callable[..., None]]:
        if not self._is_quantized(states):
            return super()._momentum_step(states)
        return ("momentum_buffer_codes", (states["momentum_buffer_codes"], states["momentum_buffer_absmax"]),
                _ops.sgd8bit_step_)


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
