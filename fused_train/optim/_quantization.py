"""Blockwise 8-bit quantization of optimizer state in torch ops, on any device: what checkpoints are converted
with (an fp32 state loaded into an 8-bit optimizer, an 8-bit state loaded into an fp32 one).

The kernels' copy of the same definition is csrc/include/fused_train/quant_math.h; the tests hold the two to
the same codes. A tensor is cut into blocks of ``BLOCK_SIZE`` elements in its logical (contiguous) order (or each of
its rows is, the last block of a row shorter: see quantize_blockwise); each block keeps one fp32 absmax, each element
one uint8 index into a 256-value dynamic code (bitsandbytes' ``create_dynamic_map``): signed on [-1, 1] for the
first moment, unsigned on [0, 1] for the second. An element quantizes to the nearest code value of
``x * (1 / absmax)`` (up to fp32 rounding at the midpoints), found without a search: comparisons with the decade
boundaries, then one product inside the decade.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK_SIZE = 256
# Elements quantized at a time when converting a checkpoint: bounds the temporaries (~25 bytes per element).
_SLICE = 1 << 22
# The smallest normal float: a block whose absmax is below it gets the inverse 0, as in quant_math.h.
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny

#: every moment an 8-bit optimizer keeps, and whether it can be negative (the signed code) or is a square (unsigned)
MOMENT_IS_SIGNED = {"exp_avg": True, "exp_avg_sq": False, "momentum_buffer": True, "square_avg": False,
                    "grad_avg": True}


class _DynamicCode:
    """The 256 values of the signed or unsigned code and the constants its rounding uses: quant_math.h's
    DynamicCode, built the same way (in double, rounded once to fp32)."""

    def __init__(self, signed: bool) -> None:
        magnitudes: list[float] = []
        low, inverse_width, last, first = [0.0], [0.0], [0], []
        # Per decade 10^(i-6), i = 0..6: 2^i (signed) or 2^(i+1) (unsigned) values at the midpoints of an even split
        # of [0.1, 1]; plus 0 and 1 (and the negatives, signed).
        for i, decade in enumerate((1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
            points = 2**i if signed else 2 ** (i + 1)
            first.append(len(magnitudes))
            magnitudes += [decade * (0.1 + (k + 0.5) * 0.9 / points) for k in range(points)]
            low.append(decade * 0.1)
            inverse_width.append(points / (decade * 0.9))
            last.append(points - 1)
        mags = torch.tensor(magnitudes, dtype=torch.float32)
        zero = len(magnitudes) if signed else 0
        self.signed = signed
        self.zero_code = zero
        self.values = torch.cat([-mags.flip(0) if signed else mags[:0], torch.zeros(1), mags, torch.ones(1)])
        # between 0 and the smallest value; between one decade's last value and the next one's first; between the
        # largest value below 1 and 1
        self.threshold = torch.stack([(0.0 + mags[0]) * 0.5]
                                     + [(mags[f - 1] + mags[f]) * 0.5 for f in first[1:]]
                                     + [(mags[-1] + 1.0) * 0.5])
        self.low = torch.tensor(low, dtype=torch.float32)
        self.inverse_width = torch.tensor(inverse_width, dtype=torch.float32)
        self.last = torch.tensor(last, dtype=torch.int32)
        self.positive = torch.tensor([zero] + [zero + 1 + f for f in first], dtype=torch.int32)
        self.negative = torch.tensor([zero] + [zero - 1 - f for f in first], dtype=torch.int32)

    def quantize(self, x: Tensor) -> Tensor:
        """The codes of fp32 ``x`` (already divided by its block's absmax), as quant_math.h's quantize_value. Works
        on 1-D ``x`` in slices, so that its temporaries stay small beside the state being converted."""
        out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        for begin in range(0, x.numel(), _SLICE):
            out[begin:begin + _SLICE] = self._quantize(x[begin:begin + _SLICE])
        return out

    def _quantize(self, x: Tensor) -> Tensor:
        on = x.device
        negative = (x < 0) if self.signed else torch.zeros_like(x, dtype=torch.bool)
        a = torch.where(negative, -x, x)
        state = torch.zeros(x.shape, dtype=torch.int32, device=on)
        for t in self.threshold[:7].tolist():
            state += a > t
        f = (a - self.low.to(on)[state]) * self.inverse_width.to(on)[state]
        # (clamped before the cast: lanes past threshold[7], even inf, get the code of 1 below anyway)
        k = torch.minimum(torch.where(f > 0, f, torch.zeros_like(f)).clamp(max=255.0).int(), self.last.to(on)[state])
        code = torch.where(negative, self.negative.to(on)[state] - k, self.positive.to(on)[state] + k)
        one = torch.where(negative, 0, 255)  # the signed code has no -1: its most negative value
        return torch.where(a > self.threshold[7].to(on), one, code).to(torch.uint8)


SIGNED = _DynamicCode(signed=True)
UNSIGNED = _DynamicCode(signed=False)
SIGNED_ZERO_CODE = SIGNED.zero_code  # 127: the code a fresh first moment holds
UNSIGNED_ZERO_CODE = UNSIGNED.zero_code  # 0


def num_blocks(numel: int) -> int:
    return (numel + BLOCK_SIZE - 1) // BLOCK_SIZE


def _as_row_blocks(flat: Tensor, rows: int, row: int) -> Tensor:
    """``flat`` as ``rows`` rows of ``row`` elements cut into blocks (num_blocks(row) each, the last one shorter),
    each row zero-padded to whole blocks: (rows * blocks per row, BLOCK_SIZE)."""
    padded = torch.nn.functional.pad(flat.view(rows, row), (0, num_blocks(row) * BLOCK_SIZE - row))
    return padded.view(-1, BLOCK_SIZE)


def quantize_blockwise(t: Tensor, *, signed: bool, by_rows: bool = False) -> tuple[Tensor, Tensor]:
    """Quantizes ``t`` (any float dtype, any device): returns uint8 codes of ``t``'s shape and the fp32 absmax of
    each block. ``by_rows``: ``t`` (2-D or more) as rows along its dim 0, each cut into blocks of ``BLOCK_SIZE`` with
    the last one shorter, absmax (rows, blocks per row); else the flat tensor cut into blocks, absmax 1-D. Both are
    csrc/include/fused_train/quant_math.h's QuantRows (one row, for the flat layout)."""
    flat = t.detach().reshape(-1).float()
    rows, row = (t.shape[0], math.prod(t.shape[1:])) if by_rows else (1, flat.numel())
    blocks = _as_row_blocks(flat, rows, row)
    absmax = blocks.abs().amax(dim=1) if blocks.numel() else flat.new_zeros(blocks.shape[0])
    inverse = torch.where(absmax >= _SMALLEST_NORMAL, 1.0 / absmax, torch.zeros_like(absmax))
    x = (blocks * inverse[:, None]).view(rows, num_blocks(row) * BLOCK_SIZE)[:, :row].reshape(-1)
    codes = (SIGNED if signed else UNSIGNED).quantize(x).reshape(t.shape)
    return codes, absmax.view(rows, num_blocks(row)) if by_rows else absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """The fp32 tensor (of ``codes``' shape) that ``codes`` and ``absmax`` stand for; the absmax's shape says the
    layout, as quantize_blockwise makes it: 1-D, the flat tensor's blocks; 2-D (rows, blocks per row), its rows'."""
    n = codes.numel()
    rows = absmax.shape[0] if absmax.dim() == 2 else 1
    row = n // rows if rows else 0
    if absmax.dim() > 2 or rows * row != n or absmax.numel() != rows * num_blocks(row):
        raise ValueError(f"8-bit state: {n} codes need an absmax of {num_blocks(n)} values (one per {BLOCK_SIZE}), "
                         f"or of shape (rows, blocks per row) for rows that divide them, got shape "
                         f"{tuple(absmax.shape)}")
    if n == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    values = (SIGNED if signed else UNSIGNED).values.to(codes.device)[codes.reshape(-1).long()]
    scale = absmax.float().reshape(rows, -1).repeat_interleave(BLOCK_SIZE, dim=1)[:, :row].reshape(-1)
    return (values * scale).reshape(codes.shape)
