"""Adam and AdamW with 8-bit blockwise state (Dettmers et al., 2021), as bitsandbytes' ``Adam8bit`` and
``AdamW8bit``: one fused kernel dequantizes each block of the moments, steps it in fp32, requantizes it and zeroes
the gradient. The quantization is csrc/include/fused_train/quant_math.h, the kernel ``Adam8bitBound`` in
csrc/cpu/optimizer_kernels.h; the Python copy of the code for checkpoints is ``_quantization.py``."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .. import _ops
from ._base import FusedOptimizer, check_stochastic_round
from ._state8bit import State8bit, check_8bit_arguments
from ._state8bit import dequantize_state_dict  # noqa: F401  (its former home; fused_train.optim has it too)
from .adam import check_adam_arguments


class Adam8bit(State8bit, FusedOptimizer, torch.optim.Optimizer):
    r"""Adam with 8-bit blockwise state, a drop-in for ``bitsandbytes.optim.Adam8bit``.

    Each moment of a param with at least ``min_8bit_size`` elements is kept as one uint8 code per element and one
    fp32 absmax per block of 256 elements (2.03 bytes per param for both moments instead of 8; each row's blocks,
    the last one shorter, for a param whose rows hold 256 elements or more). The step's math is torch.optim.Adam's
    in fp32, on the dequantized moments; the param is updated from the fp32 moments before they are requantized (as
    bitsandbytes does). Smaller params, float64 params, complex params, and DTensor params whose shards would cut a
    block (rows under 256 elements cut, column cuts off block edges) keep fp32 (float64) state and take
    :class:`fused_train.optim.Adam`'s kernel. A DTensor param's (FSDP2's) 8-bit state is DTensors
    placed as the param, each rank holding its own blocks. With ``weight_decay`` this is Adam's L2 penalty, as in
    torch.optim.Adam; :class:`AdamW8bit` decays decoupled.

    ``state_dict()`` holds ``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes`` and ``exp_avg_sq_absmax``
    for quantized params (``exp_avg``/``exp_avg_sq`` for the others) and a ``step``. A checkpoint of
    torch.optim.Adam or fused_train.optim.Adam loads here by quantizing; a checkpoint of this class loads into
    fused_train.optim.Adam by dequantizing, and into torch.optim.Adam after
    :func:`fused_train.optim.dequantize_state_dict`.

    Args:
        params (iterable): params or param groups to optimize.
        lr, betas, eps, weight_decay: as torch.optim.Adam (defaults 1e-3, (0.9, 0.999), 1e-8, 0).
        amsgrad (bool): must be False (bitsandbytes' 8-bit Adam has no AMSGrad either).
        optim_bits (int): accepted for bitsandbytes' signature; as there, only the default (32) is valid and the
            state is 8-bit regardless.
        args: bitsandbytes' override object; must be None.
        min_8bit_size (int): params with fewer elements keep fp32 state (default: 4096, as bitsandbytes).
        is_paged (bool): bitsandbytes' paged (CUDA unified memory) state; must be False.
        percentile_clipping (int): must be 100 (no clipping); bitsandbytes' adaptive clipping is not supported.
        block_wise (bool): must be True; the state is always quantized blockwise.
        maximize (bool): maximize the objective (default: False).
        zero_grad_in_step (bool or None): as :class:`fused_train.optim.Adam`.
        bf16_stochastic_round (bool): as :class:`fused_train.optim.Adam`: with bf16 params, 4 bytes per param for
            the weights and both moments, instead of 12 with fp32 masters and fp32 state (default: False).

    Example:
        >>> optimizer = fused_train.optim.Adam8bit(model.parameters(), lr=1e-3)
    """

    _state_names = ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                    "exp_avg_sq_absmax")
    _full_precision_state_names = ("exp_avg", "exp_avg_sq")
    _moments = ("exp_avg", "exp_avg_sq")
    _decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        maximize: bool = False,
        zero_grad_in_step: bool | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        name = type(self).__name__
        betas = check_adam_arguments(name, lr, betas, eps, weight_decay, None, None, False)
        check_stochastic_round(name, bf16_stochastic_round)
        if amsgrad:
            raise ValueError(f"{name}: amsgrad=True is not supported with 8-bit state (nor by bitsandbytes)")
        check_8bit_arguments(name, min_8bit_size=min_8bit_size, optim_bits=optim_bits, args=args, is_paged=is_paged,
                             percentile_clipping=percentile_clipping, block_wise=block_wise)
        # torch.optim.Adam's group keys as well, so a checkpoint loads into fused_train.optim.Adam unchanged.
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=maximize,
            foreach=None, capturable=False, differentiable=False, fused=None,
            decoupled_weight_decay=self._decoupled_weight_decay, min_8bit_size=min_8bit_size,
            bf16_stochastic_round=bf16_stochastic_round,
        )
        super().__init__(params, defaults, zero_grad_in_step=zero_grad_in_step)

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = self._new_step_tensor(param)
        for name in self._moments:
            self._new_moment(param, group, state, name)

    def _ensure_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        # Checked while the tables are built, before any group steps.
        if group.get("amsgrad"):
            raise ValueError(
                f"{type(self).__name__}: amsgrad=True is not supported with 8-bit state (a group has it, e.g. from "
                "a loaded torch.optim.Adam(amsgrad=True) checkpoint); set the group's 'amsgrad' to False to go on "
                "without it")
        if group.get("decoupled_weight_decay", self._decoupled_weight_decay) != self._decoupled_weight_decay:
            group["decoupled_weight_decay"] = self._decoupled_weight_decay  # a loaded Adam/AdamW checkpoint's

    def _state_options(self, group: dict[str, Any]) -> tuple:
        return (bool(group.get("amsgrad")), group.get("min_8bit_size"))

    def _convert_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        super()._convert_state(p, group, state)
        if self._quantizes(p, group):
            state.pop("max_exp_avg_sq", None)  # an AMSGrad checkpoint's; 8-bit Adam has no use for it

    def _step_bucket(self, group, bucket, params, grads, states, steps, *, zero_grad, lr, lr_tensor,
                     grad_scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
        hyper = dict(lr=lr, beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]),
                     eps=float(group["eps"]), maximize=group["maximize"],
                     decoupled_weight_decay=self._decoupled_weight_decay, zero_grad=zero_grad,
                     lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                     rounding_seeds=bucket.rounding_seeds, rounding_offsets=bucket.rounding_offsets)
        if self._is_quantized(states):
            _ops.adam8bit_step_(params, grads, states["exp_avg_codes"], states["exp_avg_absmax"],
                                states["exp_avg_sq_codes"], states["exp_avg_sq_absmax"], steps, **hyper)
        else:
            _ops.adam_step_(params, grads, states["exp_avg"], states["exp_avg_sq"], [], steps, amsgrad=False,
                            **hyper)


class AdamW8bit(Adam8bit):
    r"""AdamW with 8-bit blockwise state, a drop-in for ``bitsandbytes.optim.AdamW8bit``: :class:`Adam8bit` with
    decoupled weight decay, default ``weight_decay=1e-2``.

    Example:
        >>> optimizer = fused_train.optim.AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)
    """

    _decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        maximize: bool = False,
        zero_grad_in_step: bool | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged,
                         percentile_clipping=percentile_clipping, block_wise=block_wise, maximize=maximize,
                         zero_grad_in_step=zero_grad_in_step, bf16_stochastic_round=bf16_stochastic_round)
