"""Adam and AdamW with 8-bit blockwise state (Dettmers et al., 2021), as bitsandbytes' ``Adam8bit`` and
``AdamW8bit``: one fused kernel dequantizes each block of the moments, steps it in fp32, requantizes it and zeroes
the gradient. The quantization is csrc/include/fused_train/quant_math.h, the kernel ``Adam8bitBound`` in
csrc/cpu/optimizer_kernels.h; the Python copy of the code for checkpoints is ``_quantization.py``."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .. import _ops
from . import _quantization
from ._base import FusedOptimizer, _is_dtensor, check_stochastic_round
from .adam import check_adam_arguments

_QUANTIZED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, signed code)


class Adam8bit(FusedOptimizer, torch.optim.Optimizer):
    r"""Adam with 8-bit blockwise state, a drop-in for ``bitsandbytes.optim.Adam8bit``.

    Each moment of a param with at least ``min_8bit_size`` elements is kept as one uint8 code per element and one
    fp32 absmax per block of 256 elements (2.03 bytes per param for both moments instead of 8). The step's math is
    torch.optim.Adam's in fp32, on the dequantized moments; the param is updated from the fp32 moments before they
    are requantized (as bitsandbytes does). Smaller params, float64 params, complex params and DTensor shards keep
    fp32 (float64) state and take :class:`fused_train.optim.Adam`'s kernel. With ``weight_decay`` this is Adam's
    L2 penalty, as in torch.optim.Adam; :class:`AdamW8bit` decays decoupled.

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
        if optim_bits != 32:
            raise ValueError(f"{name}: optim_bits must be left at 32 (as in bitsandbytes: the state is always 8-bit), "
                             f"got {optim_bits}")
        if args is not None:
            raise ValueError(f"{name}: bitsandbytes' args override object is not supported; pass the arguments")
        if is_paged:
            raise ValueError(f"{name}: is_paged=True (bitsandbytes' CUDA unified-memory paging) is not supported")
        if percentile_clipping != 100:
            raise ValueError(f"{name}: percentile_clipping={percentile_clipping} is not supported; clip gradients "
                             "with torch.nn.utils.clip_grad_norm_ before the step")
        if not block_wise:
            raise ValueError(f"{name}: block_wise=False (one absmax per tensor) is not supported")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"{name}: min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        # torch.optim.Adam's group keys as well, so a checkpoint loads into fused_train.optim.Adam unchanged.
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=maximize,
            foreach=None, capturable=False, differentiable=False, fused=None,
            decoupled_weight_decay=self._decoupled_weight_decay, min_8bit_size=min_8bit_size,
            bf16_stochastic_round=bf16_stochastic_round,
        )
        super().__init__(params, defaults, zero_grad_in_step=zero_grad_in_step)

    def _quantizes(self, p: Tensor, group: dict[str, Any]) -> bool:
        return (p.dtype in _QUANTIZED_DTYPES and not _is_dtensor(p)
                and p.numel() >= group.get("min_8bit_size", self.defaults["min_8bit_size"]))

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = self._new_step_tensor(param)
        if not self._quantizes(param, group):
            state["exp_avg"] = self._zeros_state(param)
            state["exp_avg_sq"] = self._zeros_state(param)
            return
        blocks = _quantization.num_blocks(param.numel())
        for name, signed in _MOMENTS:
            zero = _quantization.SIGNED_ZERO_CODE if signed else _quantization.UNSIGNED_ZERO_CODE
            state[f"{name}_codes"] = torch.full(param.shape, zero, dtype=torch.uint8, device=param.device)
            state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)

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

    def _bucket_kind(self, p: Tensor, state: dict[str, Any]) -> bool:
        return "exp_avg_codes" in state

    def _convert_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Quantizes full-precision moments (a loaded fp32 checkpoint, state assigned by hand) of a param that
        keeps 8-bit state; dequantizes 8-bit moments of one that does not (e.g. after min_8bit_size grew)."""
        if not self._quantizes(p, group):
            super()._convert_state(p, group, state)
            return
        for name, signed in _MOMENTS:
            value = state.get(name)
            if isinstance(value, Tensor):
                if value.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}: state '{name}' has shape {tuple(value.shape)} but "
                                     f"its param has {tuple(p.shape)}")
                codes, absmax = _quantization.quantize_blockwise(value, signed=signed)
                state[f"{name}_codes"] = codes.to(p.device)
                state[f"{name}_absmax"] = absmax.to(p.device)
                del state[name]
        state.pop("max_exp_avg_sq", None)  # an AMSGrad checkpoint's; 8-bit Adam has no use for it

    def _check_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """As the base class, and the 8-bit state's layout: checked here, while the tables are built, so that a bad
        entry raises before any group steps."""
        super()._check_state(p, group, state)
        if "exp_avg_codes" not in state:
            return
        blocks = (_quantization.num_blocks(p.numel()),)
        for name in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
            value = state.get(name)
            codes = name.endswith("_codes")
            dtype, shape = (torch.uint8, p.shape) if codes else (torch.float32, blocks)
            if not isinstance(value, Tensor) or value.dtype != dtype or value.shape != shape:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{type(self).__name__}: state '{name}' must be a {dtype} tensor of shape "
                                 f"{tuple(shape)}, got {got}")
            if value.device != p.device:
                raise ValueError(
                    f"{type(self).__name__}: state '{name}' is on {value.device} but its param is on {p.device}; "
                    f"the fused step needs them on the same device (move the state back before stepping)"
                )
            if not value.is_contiguous():
                state[name] = value.contiguous()

    def _step_bucket(self, group, bucket, params, grads, states, steps, *, zero_grad, lr, lr_tensor,
                     grad_scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
        hyper = dict(lr=lr, beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]),
                     eps=float(group["eps"]), maximize=group["maximize"],
                     decoupled_weight_decay=self._decoupled_weight_decay, zero_grad=zero_grad,
                     lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                     rounding_seeds=bucket.rounding_seeds)
        if states["exp_avg_codes"][0] is not None:
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


def dequantize_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an :class:`Adam8bit`/:class:`AdamW8bit` ``state_dict()`` with every 8-bit moment as an fp32 tensor
    (``exp_avg``, ``exp_avg_sq``), the format torch.optim.Adam and AdamW load."""
    out = {"state": {}, "param_groups": [dict(g) for g in state_dict["param_groups"]]}
    for key, saved in state_dict["state"].items():
        state = dict(saved)
        for name, signed in _MOMENTS:
            codes, absmax = state.pop(f"{name}_codes", None), state.pop(f"{name}_absmax", None)
            if codes is not None and absmax is not None:
                state[name] = _quantization.dequantize_blockwise(codes, absmax, signed=signed)
        out["state"][key] = state
    return out
