"""Blockwise 8-bit quantization of optimizer state in torch ops, on any device: what checkpoints are converted
with (an fp32 state loaded into an 8-bit optimizer, an 8-bit state loaded into an fp32 one).

The kernels' copy of the same definition is csrc/include/fused_train/quant_math.h; the tests hold the two to
the same codes. A tensor is cut into blocks of ``BLOCK_SIZE`` elements in its logical (contiguous) order; each
block keeps one fp32 absmax, each element one uint8 index into a 256-value dynamic code (bitsandbytes'
``create_dynamic_map``): signed on [-1, 1] for the first moment, unsigned on [0, 1] for the second. An element
quantizes to the nearest code value of ``x * (1 / absmax)``; an exact midpoint rounds down.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_SIZE = 256


def _dynamic_code_values(signed: bool) -> list[float]:
    # Per decade 10^(i-6), i = 0..6: 2^i (signed, each sign) or 2^(i+1) (unsigned) values at the midpoints of an
    # even split of [0.1, 1]; plus 0 and 1. Computed in double and rounded once, as quant_math.h does.
    values = []
    for i, decade in enumerate((1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
        points = 2**i if signed else 2 ** (i + 1)
        for k in range(points):
            v = decade * (0.1 + (k + 0.5) * 0.9 / points)
            values.append(v)
            if signed:
                values.append(-v)
    values += [0.0, 1.0]
    return sorted(values)


SIGNED_CODE = torch.tensor(_dynamic_code_values(True), dtype=torch.float32)
UNSIGNED_CODE = torch.tensor(_dynamic_code_values(False), dtype=torch.float32)
SIGNED_ZERO_CODE = int((SIGNED_CODE == 0).nonzero()[0, 0])  # 127: the code a fresh first moment holds
UNSIGNED_ZERO_CODE = 0


def _code(signed: bool) -> Tensor:
    return SIGNED_CODE if signed else UNSIGNED_CODE


def _midpoints(signed: bool) -> Tensor:
    code = _code(signed)
    return (code[:-1] + code[1:]) * 0.5


def num_blocks(numel: int) -> int:
    return (numel + BLOCK_SIZE - 1) // BLOCK_SIZE


def quantize_blockwise(t: Tensor, *, signed: bool) -> tuple[Tensor, Tensor]:
    """Quantizes ``t`` (any float dtype, any device): returns uint8 codes of ``t``'s shape and the fp32 absmax of
    each block of ``BLOCK_SIZE`` elements."""
    flat = t.detach().reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, num_blocks(n) * BLOCK_SIZE - n)).view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1) if n else flat.new_zeros(0)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    x = (blocks * inverse[:, None]).reshape(-1)[:n]
    codes = torch.searchsorted(_midpoints(signed).to(flat.device), x, right=False)
    return codes.to(torch.uint8).reshape(t.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """The fp32 tensor (of ``codes``' shape) that ``codes`` and ``absmax`` stand for."""
    n = codes.numel()
    values = _code(signed).to(codes.device)[codes.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(BLOCK_SIZE)[:n]
    return (values * scale).reshape(codes.shape)
