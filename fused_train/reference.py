"""Plain-PyTorch references the tests compare fused_train against, one clearly named part per topic.

Optimizers: torch.optim itself is the reference for fp32/fp64 params. For bf16/fp16 params fused_train does
the math in fp32 with fp32 state and rounds the param once per step, which torch.optim does not (it keeps
state in the param's dtype and rounds after every op); :class:`LowPrecisionOptimizerReference` reproduces
fused_train's contract with torch.optim running on fp32 copies.

8-bit optimizer state: :func:`quantize_blockwise_reference` rounds by comparing each value with every midpoint of
the code (no search, no table); :func:`adam8bit_reference_step` is torch.optim's Adam step on the dequantized
moments, requantized after.

bf16 stochastic rounding: :func:`stochastic_rounding_bits_reference` recomputes the kernels' counter-based bits in
int64 torch ops, and :func:`round_to_bf16_stochastic_reference` rounds with them, so a test can hold a kernel to the
exact bf16 values it must write.

Cross-entropy: :func:`cross_entropy_reference`, F.cross_entropy in opmath plus the z-loss.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# -- optimizers ----------------------------------------------------------------------------------------


def torch_optimizer(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The torch.optim optimizer that ``fused_train.optim.<name>`` is compared against, called with the same
    arguments. torch.optim.Adam takes ``decoupled_weight_decay`` from torch 2.7 on; with an older torch,
    ``Adam(decoupled_weight_decay=True)`` is torch.optim.AdamW, the same update with the same state."""
    optimizer_cls = getattr(torch.optim, name)
    if name != "Adam" or "decoupled_weight_decay" in inspect.signature(optimizer_cls).parameters:
        return optimizer_cls

    def adam(params: Any, *, decoupled_weight_decay: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
        if not decoupled_weight_decay:
            return torch.optim.Adam(params, **kwargs)
        kwargs.setdefault("weight_decay", 0.0)  # Adam's default, not AdamW's
        return torch.optim.AdamW(params, **kwargs)

    return adam


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


# -- 8-bit optimizer state -----------------------------------------------------------------------------


def quantize_blockwise_reference(t: Tensor, *, signed: bool, block_size: int = 256,
                                 by_rows: bool = False) -> tuple[Tensor, Tensor]:
    """The 8-bit codes and per-block absmax of ``t``: block by block, x = value * (1 / absmax) in fp32 (0 for a
    block whose absmax is 0 or below the smallest normal float), and the code of the value nearest to x, found by
    measuring the distance to all 256 in double (the lower code on a tie). fused_train's rounding may differ only
    where x is within fp32 rounding of the midpoint between two values. The blocks: of the flat tensor (absmax 1-D),
    or with ``by_rows`` of each row along dim 0 in turn, a row's last block shorter (absmax (rows, blocks per row))."""
    from fused_train.optim import _quantization

    values = (_quantization.SIGNED if signed else _quantization.UNSIGNED).values.double()
    rows = t.shape[0] if by_rows else 1
    row = math.prod(t.shape[1:]) if by_rows else t.numel()
    per_row = (row + block_size - 1) // block_size
    flat = t.detach().float().reshape(rows, row).cpu()
    codes = torch.empty(rows, row, dtype=torch.uint8)
    absmax = torch.empty(rows, per_row, dtype=torch.float32)
    for r in range(rows):
        for b in range(per_row):
            block = flat[r, b * block_size:(b + 1) * block_size]
            absmax[r, b] = block.abs().max()
            normal = absmax[r, b] >= torch.finfo(torch.float32).tiny
            inverse = 1.0 / absmax[r, b] if normal else torch.zeros(())
            x = (block * inverse).double()
            codes[r, b * block_size:(b + 1) * block_size] = (x[:, None] - values[None, :]).abs().argmin(dim=1)
    return codes.reshape(t.shape), absmax if by_rows else absmax.reshape(-1)


def dequantize_blockwise_reference(codes: Tensor, absmax: Tensor, *, signed: bool, block_size: int = 256) -> Tensor:
    """The values of ``codes``, each times its block's absmax; a 2-D absmax (rows, blocks per row) means the blocks
    of each row (quantize_blockwise_reference's ``by_rows``), a 1-D one those of the flat tensor."""
    from fused_train.optim import _quantization

    code = _quantization.SIGNED.values if signed else _quantization.UNSIGNED.values
    rows = absmax.shape[0] if absmax.dim() == 2 else 1
    row = codes.numel() // rows if rows else 0
    block_of = torch.arange(row) // block_size  # each element's block within its row
    scale = absmax.cpu().float().reshape(rows, -1)[:, block_of] if codes.numel() else torch.zeros(rows, row)
    return (code[codes.reshape(rows, row).cpu().long()] * scale).reshape(codes.shape)


@torch.no_grad()
def blockwise8bit_reference_step(optimizer: str, param: Tensor, grad: Tensor, state: dict[str, Tensor],
                                 **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """One step of one of fused_train's 8-bit optimizers from ``state`` (codes and absmax of each moment, and a
    ``step`` where it keeps one): torch.optim's ``optimizer`` ("Adam", "SGD", "RMSprop"; ``kwargs`` are its arguments)
    on an fp32 copy of the param with the dequantized moments, the param rounded once to its dtype, the new moments
    quantized. A moment absent from ``state`` is absent for torch too (SGD's first step then copies the gradient into
    its buffer). Returns the new param and state; the inputs are left alone."""
    from fused_train.optim import _quantization

    p32 = param.detach().float().clone().requires_grad_(True)
    p32.grad = grad.detach().float().clone()
    opt = torch_optimizer(optimizer)([p32], **kwargs)
    torch_state: dict[str, Tensor] = {}
    if "step" in state:
        torch_state["step"] = state["step"].detach().float().cpu().clone()
    for name, signed in _quantization.MOMENT_IS_SIGNED.items():
        if f"{name}_codes" in state:
            torch_state[name] = dequantize_blockwise_reference(state[f"{name}_codes"], state[f"{name}_absmax"],
                                                               signed=signed)
        elif state.get(name) is not None:  # a param kept on full-precision state
            torch_state[name] = state[name].detach().float().cpu().clone()
    opt.state[p32] = torch_state
    opt.step()
    by_rows = any(v.dim() == 2 for k, v in state.items() if k.endswith("_absmax"))  # (the state's layout)
    new: dict[str, Tensor] = {}
    for name, value in opt.state[p32].items():
        if name == "step" or f"{name}_codes" not in state and name in state:
            new[name] = value
        elif name in _quantization.MOMENT_IS_SIGNED:
            new[f"{name}_codes"], new[f"{name}_absmax"] = quantize_blockwise_reference(
                value, signed=_quantization.MOMENT_IS_SIGNED[name], by_rows=by_rows)
    return p32.detach().to(param.dtype), new


def adam8bit_reference_step(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, decoupled_weight_decay: bool,
                            **adam_kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """blockwise8bit_reference_step of fused_train's 8-bit Adam (AdamW with ``decoupled_weight_decay``)."""
    return blockwise8bit_reference_step("Adam", param, grad, state, decoupled_weight_decay=decoupled_weight_decay,
                                        **adam_kwargs)


# -- cross-entropy ---------------------------------------------------------------------------------------


# -- bf16 stochastic rounding (csrc/include/fused_train/stochastic_round.h) ----------------------------------

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


def _mix32(x: Tensor) -> Tensor:
    # int64 lanes holding uint32 values; every product stays below 2^63.
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stochastic_rounding_bits_reference(seed: int, step: int, numel: int, offset: int = 0) -> Tensor:
    """The 32 random bits (as int64 values in [0, 2^32)) of elements 0..numel-1 of a param with rounding seed
    ``seed`` at step ``step`` (the step counter after the step's increment) and rounding offset ``offset`` (element
    i draws the bits of index offset + i, modulo 2^64)."""
    stream = _mix64((seed & _MASK64) ^ _mix64((step * 0xD1B54A32D192ED03 + 0x8BB84B93962EACC9) & _MASK64))
    offset &= _MASK64
    low = (offset & _MASK32) + torch.arange(numel, dtype=torch.int64)  # below 2^33: no int64 overflow
    index_high = ((offset >> 32) + (low >> 32)) & _MASK32
    high = ((stream >> 32) & _MASK32) + index_high
    key = (stream & _MASK32) ^ _mix32(high & _MASK32)
    return _mix32((low & _MASK32) ^ key)


def round_to_bf16_stochastic_reference(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 ``x`` rounded to bf16 with ``bits`` (one per element, from :func:`stochastic_rounding_bits_reference`):
    the high 16 bits are added to x's bit pattern and the low 16 dropped; NaN stays NaN."""
    x = x.detach().to(torch.float32).contiguous().reshape(-1)
    pattern = x.view(torch.int32).to(torch.int64) & _MASK32
    rounded = (pattern + (bits.reshape(-1) >> 16)) & 0xFFFF0000
    rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded).to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def cross_entropy_reference(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """What :func:`fused_train.nn.functional.cross_entropy_with_lse` computes, with torch ops in opmath
    (fp32 for bf16/fp16 input, the input's dtype otherwise): ``(loss, z_loss)`` in opmath, unrounded.

    Without z-loss this is ``F.cross_entropy`` on upcast logits; the z-loss adds ``scale · lse²`` to each row
    that is not ignored and is reduced with the loss (same denominator)."""
    opmath = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(opmath)
    prob = target.is_floating_point()
    t = target.to(opmath) if prob else target.long()  # torch takes no int32 class indices
    w = weight.to(opmath) if weight is not None else None
    rows = F.cross_entropy(x, t, w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(x, dim=1 if x.dim() > 1 else 0)
    kept = torch.ones_like(lse, dtype=torch.bool) if prob else target != ignore_index
    z_rows = torch.where(kept, lse_square_scale * lse * lse, torch.zeros_like(lse))
    rows = rows + z_rows
    if reduction == "none":
        return rows, z_rows
    if reduction == "sum":
        return rows.sum(), z_rows.sum()
    if prob:
        denominator = torch.tensor(float(lse.numel()), dtype=opmath)
    elif w is not None:
        denominator = torch.where(kept, w[torch.where(kept, target, 0)], torch.zeros((), dtype=opmath)).sum()
    else:
        denominator = kept.sum().to(opmath)
    return rows.sum() / denominator, z_rows.sum() / denominator
