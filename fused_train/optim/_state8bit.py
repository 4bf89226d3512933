"""What the optimizers with 8-bit blockwise state share (Adam8bit, AdamW8bit, SGD8bit, RMSprop8bit): bitsandbytes'
arguments, which params are quantized, the state's creation, checks and checkpoint conversion. Each moment of a
quantized param is ``<name>_codes`` (uint8, the param's shape) and ``<name>_absmax`` (fp32, one per block of up to 256
elements: each row's, for a param of rows of 256 elements or more, see _absmax_shape); the quantization is
``_quantization.py`` here and csrc/include/fused_train/quant_math.h in the kernels.

A DTensor param (FSDP2's, tensor parallelism's) keeps 8-bit state where its shards never cut a block: rows (all but
dim 0) of 256 elements or more, cut along dim 0 (Shard(0), _StridedShard(0)), replicated, or cut along dim 1 on block
edges (Shard(1)), so that each shard's blocks are blocks of the whole tensor (see _absmax_shape). Its codes are a
DTensor placed as the param, and its absmax one of shape (rows, blocks per row) placed the same way:
each rank steps its own blocks, and the state is the whole tensor's, cut as the param is. So ``full_tensor()`` of the
state is what one process would hold, and torch.distributed.checkpoint reshards it like the params, to any number of
ranks (for the params both sides keep in 8-bit: one whose shards keep fp32 state is 8-bit in one process, under other
keys)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _quantization
from ._base import _as_shards_of, _is_dtensor, _kernel_view, _placed_as, _placed_like, _placement_error

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


def _absmax_shape(p: Tensor) -> tuple[int, ...] | None:
    """The shape of a quantized param's absmax, which says its blocks. A param of 2 or more dims whose rows (dim 0's
    entries) hold 256 elements or more: each row cut into blocks of 256, the last one shorter where the row is not a
    multiple of 256 (576 = 256 + 256 + 64), absmax (rows, blocks per row); other params: the flat param cut into
    blocks of 256, absmax (blocks,). By rows, no block crosses two rows, so the shards that cut a param between rows
    hold whole blocks (at a cost: rows of 257 elements keep 2 absmax each, 1.03 bytes per element instead of 1.016).
    The same for a plain tensor and for the whole of a DTensor, so that a checkpoint moves between the two (and between
    any numbers of ranks) unchanged. For a DTensor it is None where the placements would cut a block (the param then
    keeps full-precision state). Cuts of such rows along dim 0 (Shard(0), FSDP2's; _StridedShard(0), FSDP2's over
    tensor parallelism) hold whole rows, replicas the whole tensor, and cuts along dim 1 (Shard(1), tensor
    parallelism's row-wise weights) whole blocks where every rank's part of a row starts on a block's edge and ends on
    one or at the row's end, and the absmax's columns, cut alike, are those blocks (see _cuts_on_block_edges): the
    absmax placed as the param then holds each rank's own blocks. Other cuts (of dims after 1), and rows of fewer than
    256 elements, keep full-precision state."""
    rows = p.shape[0] if p.dim() >= 2 else 0
    row = p.numel() // rows if rows else 0
    by_rows = row >= _quantization.BLOCK_SIZE
    shape = (rows, _quantization.num_blocks(row)) if by_rows else (_quantization.num_blocks(p.numel()),)
    if not _is_dtensor(p):
        return shape
    kinds = [type(placement).__name__ for placement in p.placements]  # (exact names: _StridedShard is a Shard)
    if all(kind == "Replicate" for kind in kinds):
        return shape
    if not by_rows:
        return None
    column_cuts = []  # the mesh sizes cutting dim 1, in order
    for mesh_dim, (kind, placement) in enumerate(zip(kinds, p.placements)):
        dim = placement.dim % p.dim() if kind in ("Shard", "_StridedShard") else None
        if kind == "Shard" and dim == 1:
            column_cuts.append(p.device_mesh.size(mesh_dim))  # (size(): what torch.compile reads as a constant)
        elif kind != "Replicate" and dim != 0:
            return None
    return shape if _cuts_on_block_edges(p.shape[1], row // p.shape[1], shape[1], column_cuts) else None


def _cuts_on_block_edges(size: int, stride: int, blocks: int, chunks: list[int]) -> bool:
    """Whether DTensor's cuts of a row along dim 1 (``size`` indices of ``stride`` elements each, the row's
    ``blocks`` blocks, of 256 but the last) give every rank whole blocks, and the same cuts of the absmax's ``blocks``
    columns give it those blocks' columns. DTensor cuts a dim as torch.chunk does, into ``chunks[0]`` pieces, each of
    those into ``chunks[1]``, and so on (one dim cut by several mesh dims); both are cut alike, piece by piece: each
    piece of indices [a, b) must hold the elements of its columns [c, d), from c * 256 to d * 256 or the row's end."""
    row, edge = size * stride, _quantization.BLOCK_SIZE
    pieces = [(0, size, 0, blocks)]  # (first index, end index, first column, end column)
    for count in chunks:
        cut = []
        for first, end, first_column, end_column in pieces:
            step, column_step = -(-(end - first) // count), -(-(end_column - first_column) // count)
            for i in range(count):
                a, b = min(end, first + step * i), min(end, first + step * (i + 1))
                c = min(end_column, first_column + column_step * i)
                d = min(end_column, first_column + column_step * (i + 1))
                if (a, c) != (b, d) and (a * stride != c * edge or b * stride != min(d * edge, row)):
                    return False
                cut.append((a, b, c, d))
        pieces = cut
    return True


def _local_absmax_shape(local: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the absmax of ``local`` (a plain param, or a DTensor param's shard: its own blocks) where the
    whole param's absmax has ``shape``."""
    if len(shape) != 2:
        return shape
    return (local.shape[0], _quantization.num_blocks(math.prod(local.shape[1:])))


def _quantize_moment(p: Tensor, value: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of a full-precision moment of the quantized param ``p``, on ``p``'s device; for a DTensor,
    each rank quantizes its own shard (whole blocks, see _absmax_shape), placed as the param."""
    shape = _absmax_shape(p)
    local = _kernel_view(value)
    # (by rows: an absmax of _local_absmax_shape's shape)
    codes, absmax = _quantization.quantize_blockwise(local, signed=signed, by_rows=len(shape) == 2)
    codes, absmax = codes.to(p.device), absmax.to(p.device)
    if not _is_dtensor(p):
        return codes, absmax
    return _placed_as(p, codes, tuple(p.shape)), _placed_as(p, absmax, shape)


def dequantize_moment(codes: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """The fp32 moment that ``codes`` and ``absmax`` stand for (of the codes' shape); for DTensor codes, each rank
    dequantizes its shard, and the moment is placed as the codes."""
    if not _is_dtensor(codes):
        return _quantization.dequantize_blockwise(codes, absmax, signed=signed)
    if not _placed_like(codes, absmax):
        raise ValueError("8-bit state: the absmax must be cut as its codes, got codes placed "
                         f"{tuple(codes.placements)} and absmax {tuple(getattr(absmax, 'placements', ())) or 'plain'}")
    values = _quantization.dequantize_blockwise(_kernel_view(codes), _kernel_view(absmax), signed=signed)
    return _placed_as(codes, values, tuple(codes.shape))


class State8bit:
    """Mixin for a FusedOptimizer subclass with 8-bit state. The subclass lists its moments in ``_moments`` (names
    from MOMENT_IS_SIGNED; the first one exists whenever the param has state, and decides its bucket) and keeps
    ``min_8bit_size`` in its defaults."""

    _moments: tuple[str, ...] = ()

    def _quantizes(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Params under min_8bit_size elements (of the whole tensor, for a DTensor), float64 and complex params, and
        DTensor params whose shards would cut blocks (see _absmax_shape) keep full-precision state."""
        return (p.dtype in _QUANTIZED_DTYPES
                and p.numel() >= group.get("min_8bit_size", self.defaults["min_8bit_size"])
                and _absmax_shape(p) is not None)

    def _new_moment(self, param: Tensor, group: dict[str, Any], state: dict[str, Any], name: str) -> None:
        """A zero moment: 8-bit (the code of 0, absmax 0) for a quantized param, else full precision."""
        if not self._quantizes(param, group):
            state[name] = self._zeros_state(param)
            return
        zero = _quantization.SIGNED_ZERO_CODE if MOMENT_IS_SIGNED[name] else _quantization.UNSIGNED_ZERO_CODE
        local = _kernel_view(param)  # (a DTensor's shard: each rank makes its own part of the state)
        shape = _absmax_shape(param)
        codes = torch.full(local.shape, zero, dtype=torch.uint8, device=local.device)
        absmax = torch.zeros(_local_absmax_shape(local, shape), dtype=torch.float32, device=local.device)
        if _is_dtensor(param):
            codes, absmax = _placed_as(param, codes, tuple(param.shape)), _placed_as(param, absmax, shape)
        state[f"{name}_codes"], state[f"{name}_absmax"] = codes, absmax

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
        shape = _absmax_shape(p)
        for name in self._moments:
            codes, absmax = state.get(f"{name}_codes"), state.get(f"{name}_absmax")
            if _flat_blocks_of_split_rows(p, shape, codes, absmax):
                # a checkpoint of the layout before rows of any length had blocks of their own: its blocks cross
                # rows, so the moment is requantized (one rounding more, once)
                whole = [t.full_tensor() if _is_dtensor(t) else t for t in (codes, absmax)]
                state[name] = _quantization.dequantize_blockwise(*whole, signed=MOMENT_IS_SIGNED[name]).to(p.device)
                del state[f"{name}_codes"], state[f"{name}_absmax"]
        for name in self._moments:
            value = state.get(name)
            if isinstance(value, Tensor):
                if value.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}: state '{name}' has shape {tuple(value.shape)} but "
                                     f"its param has {tuple(p.shape)}")
                if _is_dtensor(p) and not _is_dtensor(value):
                    value = _as_shards_of(p, value)  # a checkpoint's whole moment (torch's full_state_dict)
                if not _placed_like(p, value):
                    raise _placement_error(self, name, p, value)
                codes, absmax = _quantize_moment(p, value, MOMENT_IS_SIGNED[name])
                state[f"{name}_codes"], state[f"{name}_absmax"] = codes, absmax
                del state[name]

    def _check_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """As the base class, and the 8-bit state's layout: checked here, while the tables are built, so that a bad
        entry raises before any group steps."""
        super()._check_state(p, group, state)
        blocks = (_absmax_shape(p) if self._bucket_kind(p, state) else None) or (
            _quantization.num_blocks(p.numel()),)
        # A quantized param's moments in use must all be there; any other moment only if a part of it is.
        required = self._moments_in_use(group) if self._bucket_kind(p, state) else ()
        for moment in self._moments:
            if moment not in required and f"{moment}_codes" not in state and f"{moment}_absmax" not in state:
                continue
            for name in (f"{moment}_codes", f"{moment}_absmax"):
                value = state.get(name)
                codes = name.endswith("_codes")
                dtype, shape = (torch.uint8, p.shape) if codes else (torch.float32, blocks)
                if _is_dtensor(p) and isinstance(value, Tensor) and not _is_dtensor(value):
                    # one process's whole state (a checkpoint loaded into shards): this rank's part of it
                    if codes and value.shape == p.shape:
                        value = state[name] = _as_shards_of(p, value)
                    elif not codes and value.numel() == math.prod(shape):
                        value = state[name] = _as_shards_of(p, value.reshape(shape))
                if not codes and _other_absmax_layout(p, value, shape):
                    value = state[name] = _absmax_in_layout(p, value, shape)
                if not isinstance(value, Tensor) or value.dtype != dtype or value.shape != shape:
                    got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"{type(self).__name__}: state '{name}' must be a {dtype} tensor of shape "
                                     f"{tuple(shape)}, got {got}")
                if not _placed_like(p, value):
                    raise _placement_error(self, name, p, value)
                if value.device != p.device:
                    raise ValueError(
                        f"{type(self).__name__}: state '{name}' is on {value.device} but its param is on "
                        f"{p.device}; the fused step needs them on the same device (move the state back before "
                        "stepping)"
                    )
                if not _kernel_view(value).is_contiguous():  # (a DTensor's contiguous() reads its global strides)
                    local = _kernel_view(value).contiguous()
                    state[name] = _placed_as(p, local, tuple(value.shape)) if _is_dtensor(value) else local


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
                state[name] = dequantize_moment(codes, absmax, signed=signed)
        out["state"][key] = state
    return out


def _flat_blocks_of_split_rows(p: Tensor, shape: tuple[int, ...] | None, codes: Any, absmax: Any) -> bool:
    """Whether (codes, absmax) are a whole moment of ``p`` in the flat layout (1-D absmax, blocks of 256 across
    rows) where ``p``'s rows, not a multiple of 256, now cut the blocks (``shape``, its absmax's): fused_train saved
    them so before rows of any length had their own blocks."""
    if shape is None or len(shape) != 2 or shape[0] < 2 or (p.numel() // shape[0]) % _quantization.BLOCK_SIZE == 0:
        return False
    return (isinstance(codes, Tensor) and isinstance(absmax, Tensor) and absmax.dim() == 1
            and codes.shape == p.shape and absmax.numel() == _quantization.num_blocks(p.numel()))


def _other_absmax_layout(p: Tensor, value: Any, shape: tuple[int, ...]) -> bool:
    """Whether ``value`` is an absmax of the right blocks in another layout: a checkpoint's 1-D absmax (saved before
    the row layout, or by bitsandbytes' count) where rows are wanted, or one that a loader cut as a 1-D tensor."""
    if not isinstance(value, Tensor) or value.dtype != torch.float32 or value.numel() != math.prod(shape):
        return False
    return value.shape != shape or (_is_dtensor(p) and _is_dtensor(value) and not _placed_like(p, value))


def _absmax_in_layout(p: Tensor, value: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``value`` (the blocks' absmax in order, in another shape or cut) in ``shape``, cut as the param's state. For a
    DTensor this gathers the whole absmax (a collective every rank of the mesh makes, as the step's table building
    is): once, when a checkpoint of another layout is loaded."""
    if not _is_dtensor(p):
        return value.reshape(shape) if not _is_dtensor(value) else value
    if not _is_dtensor(value) or value.device_mesh != p.device_mesh:
        return value
    return _as_shards_of(p, value.full_tensor().reshape(shape))
