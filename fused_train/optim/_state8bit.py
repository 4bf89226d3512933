"""What the optimizers with 8-bit blockwise state share (Adam8bit, AdamW8bit, SGD8bit, RMSprop8bit): bitsandbytes'
arguments, which params are quantized, the state's creation, checks and checkpoint conversion. Each moment of a
quantized param is ``<name>_codes`` (uint8, the param's shape) and ``<name>_absmax`` (fp32, one per 256 elements);
the quantization is ``_quantization.py`` here and csrc/include/fused_train/quant_math.h in the kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _quantization
from ._base import _is_dtensor

_QUANTIZED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MOMENT_IS_SIGNED = _quantization.MOMENT_IS_SIGNED


def check_8bit_arguments(name: str, *, min_8bit_size: Any, optim_bits: int = 32, args: Any = None,
                         is_paged: bool = False, percentile_clipping: int = 100, block_wise: bool = True) -> None:
    """bitsandbytes' arguments: those with one meaning here are checked, the others refused with what to do."""
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


class State8bit:
    """Mixin for a FusedOptimizer subclass with 8-bit state. The subclass lists its moments in ``_moments`` (names
    from MOMENT_IS_SIGNED; the first one exists whenever the param has state, and decides its bucket) and keeps
    ``min_8bit_size`` in its defaults."""

    _moments: tuple[str, ...] = ()

    def _quantizes(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Params under min_8bit_size elements, float64, complex and DTensor params keep full-precision state."""
        return (p.dtype in _QUANTIZED_DTYPES and not _is_dtensor(p)
                and p.numel() >= group.get("min_8bit_size", self.defaults["min_8bit_size"]))

    def _new_moment(self, param: Tensor, group: dict[str, Any], state: dict[str, Any], name: str) -> None:
        """A zero moment: 8-bit (the code of 0, absmax 0) for a quantized param, else full precision."""
        if not self._quantizes(param, group):
            state[name] = self._zeros_state(param)
            return
        zero = _quantization.SIGNED_ZERO_CODE if MOMENT_IS_SIGNED[name] else _quantization.UNSIGNED_ZERO_CODE
        state[f"{name}_codes"] = torch.full(param.shape, zero, dtype=torch.uint8, device=param.device)
        state[f"{name}_absmax"] = torch.zeros(_quantization.num_blocks(param.numel()), dtype=torch.float32,
                                              device=param.device)

    def _moments_in_use(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The moments a quantized param of this group must have (the first one, and those its options use)."""
        return self._moments

    def _has_moment(self, state: dict[str, Any], name: str) -> bool:
        return state.get(name) is not None or f"{name}_codes" in state

    def _bucket_kind(self, p: Tensor, state: dict[str, Any]) -> bool:
        return f"{self._moments[0]}_codes" in state

    def _is_quantized(self, states: dict[str, list]) -> bool:
        """Whether a bucket (its state lists, as _step_bucket gets them) holds 8-bit state (see _bucket_kind)."""
        return states[f"{self._moments[0]}_codes"][0] is not None

    def _convert_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Quantizes full-precision moments (a loaded fp32 checkpoint, state assigned by hand) of a param that keeps
        8-bit state; dequantizes 8-bit moments of one that does not (e.g. after min_8bit_size grew)."""
        if not self._quantizes(p, group):
            super()._convert_state(p, group, state)
            return
        for name in self._moments:
            value = state.get(name)
            if isinstance(value, Tensor):
                if value.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}: state '{name}' has shape {tuple(value.shape)} but "
                                     f"its param has {tuple(p.shape)}")
                codes, absmax = _quantization.quantize_blockwise(value, signed=MOMENT_IS_SIGNED[name])
                state[f"{name}_codes"] = codes.to(p.device)
                state[f"{name}_absmax"] = absmax.to(p.device)
                del state[name]

    def _check_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """As the base class, and the 8-bit state's layout: checked here, while the tables are built, so that a bad
        entry raises before any group steps."""
        super()._check_state(p, group, state)
        blocks = (_quantization.num_blocks(p.numel()),)
        # A quantized param's moments in use must all be there; any other moment only if a part of it is.
        required = self._moments_in_use(group) if self._bucket_kind(p, state) else ()
        for moment in self._moments:
            if moment not in required and f"{moment}_codes" not in state and f"{moment}_absmax" not in state:
                continue
            for name in (f"{moment}_codes", f"{moment}_absmax"):
                value = state.get(name)
                codes = name.endswith("_codes")
                dtype, shape = (torch.uint8, p.shape) if codes else (torch.float32, blocks)
                if not isinstance(value, Tensor) or value.dtype != dtype or value.shape != shape:
                    got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"{type(self).__name__}: state '{name}' must be a {dtype} tensor of shape "
                                     f"{tuple(shape)}, got {got}")
                if value.device != p.device:
                    raise ValueError(
                        f"{type(self).__name__}: state '{name}' is on {value.device} but its param is on "
                        f"{p.device}; the fused step needs them on the same device (move the state back before "
                        "stepping)"
                    )
                if not value.is_contiguous():
                    state[name] = value.contiguous()


def dequantize_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an 8-bit optimizer's ``state_dict()`` (:class:`Adam8bit`, :class:`AdamW8bit`, :class:`SGD8bit`,
    :class:`RMSprop8bit`) with every 8-bit moment as an fp32 tensor (``exp_avg``, ``momentum_buffer``, ...), the
    format the torch.optim optimizer of the same update loads."""
    out = {"state": {}, "param_groups": [dict(g) for g in state_dict["param_groups"]]}
    for key, saved in state_dict["state"].items():
        state = dict(saved)
        for name, signed in MOMENT_IS_SIGNED.items():
            codes, absmax = state.pop(f"{name}_codes", None), state.pop(f"{name}_absmax", None)
            if codes is not None and absmax is not None:
                state[name] = _quantization.dequantize_blockwise(codes, absmax, signed=signed)
        out["state"][key] = state
    return out
