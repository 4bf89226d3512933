"""Adam and AdamW with one fused kernel per device and dtype; the math is csrc/include/fused_train/optim_math.h
(``adam_update``), the kernels csrc/cpu/optimizer_kernels.h and csrc/cuda/optimizers.cu."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .. import _ops
from ._base import FusedOptimizer, check_implementation_flags, check_lr, check_stochastic_round


def check_adam_arguments(name: str, lr: float | Tensor, betas: tuple, eps: float, weight_decay: float,
                         foreach: bool | None, fused: bool | None, differentiable: bool) -> tuple:
    """torch.optim.Adam's argument checks, same messages; returns betas as the group keeps them."""
    check_lr(lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    check_implementation_flags(name, foreach, fused, differentiable)
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
    # As torch: tensor betas stay tensors in the group (0-dim), numbers stay numbers.
    return tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas)


class Adam(FusedOptimizer, torch.optim.Adam):
    r"""Adam (Kingma & Ba, 2015) as :class:`torch.optim.Adam`, in one fused kernel per device and dtype.

    Same arguments, defaults, validation, param groups and ``state_dict`` format as ``torch.optim.Adam``
    (per-param ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so checkpoints move between the
    two and LR schedulers work unchanged. Differences: state is fp32 for bf16/fp16 params (rounded once
    into the param per step); ``step`` is an fp32 tensor on the param's device, advanced by the kernel;
    GradScaler's unscale and inf-skip happen inside the kernel.

    Args:
        params (iterable): params or param groups to optimize.
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        betas (Tuple[float, float], optional): coefficients of the running averages of the gradient and its
            square (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator for numerical stability (default: 1e-8).
        weight_decay (float, optional): L2 penalty, or decoupled decay with ``decoupled_weight_decay``
            (default: 0).
        amsgrad (bool, optional): use the AMSGrad variant (default: False).
        maximize (bool, optional): maximize the objective instead of minimizing (default: False).
        foreach, fused, differentiable: torch's implementation switches; fused_train is always fused, so
            ``foreach=True``, ``fused=False`` and ``differentiable=True`` raise ``ValueError``.
        capturable (bool, optional): accepted; the kernels never synchronize with the host, so steps can
            be captured in a CUDA graph either way (default: False).
        decoupled_weight_decay (bool, optional): AdamW's decoupled decay (default: False).
        zero_grad_in_step (bool or None, optional): write zeros into each gradient in the same pass that
            reads it. ``None`` (default) does so after the loop last called ``zero_grad(set_to_none=False)``,
            i.e. exactly when gradients are kept allocated; see the README's "gradient zeroing".
        bf16_stochastic_round (bool, optional): round each update into bf16 params stochastically instead of
            to nearest, so bf16 weights without fp32 master copies keep learning from updates smaller than their
            precision (default: False). The random bits are a function of the param's ``rounding_seed`` (state),
            its step and the element: reproducible, and the same on every rank. Other dtypes are unaffected.

    Example:
        >>> optimizer = fused_train.optim.Adam(model.parameters(), lr=1e-3)
        >>> loss_fn(model(x), y).backward()
        >>> optimizer.step()
        >>> optimizer.zero_grad()
    """

    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        zero_grad_in_step: bool | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        betas = check_adam_arguments(type(self).__name__, lr, betas, eps, weight_decay, foreach, fused, differentiable)
        check_stochastic_round(type(self).__name__, bf16_stochastic_round)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, bf16_stochastic_round=bf16_stochastic_round,
        )
        super().__init__(params, defaults, zero_grad_in_step=zero_grad_in_step)

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = self._new_step_tensor(param)
        state["exp_avg"] = self._zeros_state(param)
        state["exp_avg_sq"] = self._zeros_state(param)

    def _ensure_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = self._zeros_state(param)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A checkpoint of torch.optim.Adam from before torch 2.7 has no decoupled_weight_decay (that Adam had
        # only L2 decay): it loads as False, as in torch.optim.Adam.__setstate__.
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", False)

    def _state_options(self, group: dict[str, Any]) -> tuple:
        return (bool(group["amsgrad"]),)

    def _step_bucket(self, group, bucket, params, grads, states, steps, *, zero_grad, lr, lr_tensor,
                     grad_scale, found_inf) -> None:
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        _ops.adam_step_(
            params, grads, states["exp_avg"], states["exp_avg_sq"],
            states["max_exp_avg_sq"] if amsgrad else [], steps,
            lr=lr, beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]), amsgrad=amsgrad, maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"], zero_grad=zero_grad,
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, rounding_seeds=bucket.rounding_seeds,
            rounding_offsets=bucket.rounding_offsets,
        )


class AdamW(Adam, torch.optim.AdamW):
    r"""AdamW (Loshchilov & Hutter, 2019) as :class:`torch.optim.AdamW`: :class:`Adam` with decoupled
    weight decay, default ``weight_decay=1e-2``. Same arguments and ``state_dict`` format as torch's.

    Example:
        >>> optimizer = fused_train.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model.to(torch.bfloat16)  # bf16 weights, no fp32 masters:
        >>> optimizer = fused_train.optim.AdamW(model.parameters(), lr=1e-4, bf16_stochastic_round=True)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        zero_grad_in_step: bool | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            zero_grad_in_step=zero_grad_in_step, bf16_stochastic_round=bf16_stochastic_round,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
