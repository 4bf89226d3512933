"""Fused functional losses: :func:`cross_entropy`, a drop-in for :func:`torch.nn.functional.cross_entropy`."""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction

from .. import _C, _ops

__all__ = ["cross_entropy", "cross_entropy_with_lse", "CrossEntropyOutput", "linear_cross_entropy"]

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
# The eager loss of (N, C) logits, fused_train::cross_entropy_loss, two ways. The op's own C++ entry point
# (OpOverload._op: OpOverload.__call__ only adds a Python frame) honours __torch_function__ overrides and
# modes. Without any, _C's entry point calls the same op through the dispatcher with positional arguments
# and no boxing, ~5 us less per call (csrc/python_module.cpp). torch.compile traces _CrossEntropyFunction.
_cross_entropy_loss_op = getattr(torch.ops.fused_train.cross_entropy_loss.default, "_op",
                                 torch.ops.fused_train.cross_entropy_loss.default)
_cross_entropy_loss = _C._cross_entropy_loss
_has_torch_function = torch._C._has_torch_function_variadic


class _CrossEntropyFunction(torch.autograd.Function):
    """The 2-D core. When the logits need a gradient (``grad_in_forward``), the forward writes it too, for a
    loss gradient of 1, while each row is still in cache (over the logits with ``inplace_backward``), and
    the backward only applies the real loss gradient: nothing at all for ``loss.backward()`` (on CUDA a
    kernel whose blocks return at once); for any other loss gradient the rows are recomputed from the
    saved logits with the scale applied before the one rounding (cross_entropy_apply_grad_loss_; on CPU a
    power-of-two scale multiplies bf16/fp32/fp64 gradients instead, exactly). With ``inplace_backward`` the
    logits are gone, and the gradient is multiplied: rounded twice (README, Differences), except for fp16,
    the dtype of loss scaling, whose (p - y)/N would underflow before the scale arrives: there the forward
    writes nothing and the backward writes the gradient over the logits with the real loss gradient (one
    more read of the logits than the fused pass).

    That gradient serves the first backward. A second one through the same graph (``retain_graph=True``)
    recomputes it from the saved logits and each row's log-sum-exp (two opmath numbers, see
    _ops.cross_entropy_forward), or raises with ``inplace_backward``, whose logits are gone. Differentiating
    the gradient again (double backward) raises."""

    @staticmethod
    def forward(ctx, input, target, weight, options):
        # options: a plain tuple (a NamedTuple costs a call on every loss): reduction (0 none, 1 mean, 2 sum),
        # ignore_index, label_smoothing, lse_square_scale, inplace_backward, grad_in_forward (the logits need
        # a gradient: write it here), want_lse (also return the z-loss and each row's log-sum-exp),
        # opmath_loss (autocast: the loss in fp32, as torch's).
        reduction, ignore_index, label_smoothing, lse_square_scale, inplace, grad_in_forward, want_lse, opmath = (
            options
        )
        if grad_in_forward and not (inplace and input.dtype == torch.float16):
            loss, z_loss, row_lse, denominator, grad = _ops.cross_entropy_forward_backward(
                input, target, weight, reduction=reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, inplace=inplace,
                opmath_loss=opmath,
            )
            if inplace:
                # Anything else that saved these logits for its backward must see that they changed.
                torch.autograd.graph.increment_version(input)
        else:
            loss, z_loss, row_lse, denominator = _ops.cross_entropy_forward(
                input, target, weight, reduction=reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, opmath_loss=opmath,
            )
            grad = None
            if inplace and grad_in_forward:
                # fp16: the backward writes over the logits; anything else that saved them must know now.
                torch.autograd.graph.increment_version(input)
                ctx.write_over_logits = True
        ctx.save_for_backward(input, target, weight, row_lse, denominator)
        ctx.options = options
        # Not a saved tensor: it is handed over, not read, and once backward drops it autograd can keep it
        # as the leaf's .grad without a copy.
        ctx.grad = grad
        if not want_lse:
            return loss
        ctx.mark_non_differentiable(z_loss, row_lse)
        return loss, z_loss, row_lse

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if not torch.is_grad_enabled():
            return _backward(ctx, grad_loss)
        # create_graph=True: the gradient comes out of a kernel, not of differentiable ops; it gets a node
        # that raises if anything differentiates through it.
        with torch.no_grad():
            grad, *rest = _backward(ctx, grad_loss)
        if grad is not None:
            grad = _NoDoubleBackward.apply(grad.detach().requires_grad_())
        return (grad, *rest)


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, grad_grad):
        _raise_double_backward()


def _raise_double_backward():
    raise RuntimeError(
        "cross_entropy: double backward (differentiating the gradient of fused_train's cross-entropy "
        "again, e.g. a Hessian) is not supported; use torch.nn.functional.cross_entropy for that"
    )


def _backward(ctx, grad_loss):
    if ctx.needs_input_grad[2]:
        raise RuntimeError(  # as torch's nll_loss, rather than silently no gradient
            "cross_entropy: the derivative for 'weight' is not implemented (pass a weight that does not "
            "require grad, e.g. weight.detach())"
        )
    grad = ctx.grad
    reduction, ignore_index, label_smoothing, lse_square_scale, inplace, _, _, _ = ctx.options
    if grad is not None and not inplace and (_transforms_active() or _compiled_autograd_enabled()):
        # A batched grad_loss (autograd.grad(..., is_grads_batched=True)) wants one gradient per entry: the
        # functional backward below, which has a vmap rule, not the one kept from the forward. Compiled
        # autograd replays this backward from what the node held when it traced it, so letting go of the kept
        # gradient would not last: a retain_graph backward would get it again, already scaled in place.
        ctx.grad = grad = None
    if grad is not None:
        ctx.grad = None
        if inplace:
            _ops.cross_entropy_scale_grad_(grad, grad_loss)
        # (The probe returns a bool, which torch.compile cannot trace: a compiled backward always applies.)
        elif _is_compiling() or not _ops.cross_entropy_grad_loss_is_one(grad_loss):
            _ops.cross_entropy_apply_grad_loss_(
                grad, grad_loss, *ctx.saved_tensors, reduction=reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
            )
        return grad, None, None, None
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    if inplace and getattr(ctx, "write_over_logits", False):
        ctx.write_over_logits = False
        grad = _ops.cross_entropy_backward(
            grad_loss, *ctx.saved_tensors, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, inplace=True,
        )
        return grad, None, None, None
    if inplace:
        raise RuntimeError(
            "cross_entropy: a second backward through a loss computed with inplace_backward=True is not "
            "supported: the first one used the gradient written over the logits, and the logits are gone"
        )
    return _gradient(ctx, grad_loss), None, None, None


class _Options(tuple):
    """A loss's options as one argument of an autograd.Function under torch.func: a tuple subclass, which
    torch's pytrees take as one leaf. A plain tuple is flattened into its items by the vmap rule that
    generate_vmap_rule makes for forward mode (jacfwd), which then fails to match one tangent per argument."""


class _CrossEntropyTransformFunction(torch.autograd.Function):
    """The 2-D core under torch.func transforms (grad, vjp, vmap, jacrev, jvp): functional ops only, in the
    form functorch needs (setup_context), vmapped through the ops' own vmap rules (_ops.py), which fold the
    vmapped dimension into the rows. The gradient is computed in the backward from the saved logits;
    ``inplace_backward`` has no effect here. Kept apart from _CrossEntropyFunction so that the ordinary call
    pays for none of this (setup_context makes every apply bind its arguments by signature)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, options):
        reduction, ignore_index, label_smoothing, lse_square_scale, _, _, _, opmath = options
        return _ops.cross_entropy_forward(
            input, target, weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, opmath_loss=opmath,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, options = inputs
        _, z_loss, row_lse, denominator = output
        ctx.save_for_backward(input, target, weight, row_lse, denominator)
        ctx.save_for_forward(input, target, weight, row_lse, denominator)
        ctx.options = options
        ctx.mark_non_differentiable(z_loss, row_lse, denominator)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if _is_compiling():
            _check_compiled_transform_backward("cross_entropy")
        if ctx.needs_input_grad[2]:
            _backward(ctx, grad_loss)  # raises, naming weight (0 would be silently wrong)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        input, target, weight, row_lse, denominator = ctx.saved_tensors
        grad = _TransformGradient.apply(grad_loss, input, target, weight, row_lse, denominator, *ctx.options[:4])
        return grad, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, *unused):
        if _is_compiling():
            _refuse_compiled_transform("cross_entropy")
        # d loss_r = Σ_j ∂loss_r/∂x_rj · t_rj: the gradient for a loss gradient of ones, times the tangent.
        reduction = ctx.options[0]
        input, row_lse = ctx.saved_tensors[0], ctx.saved_tensors[3]
        ones = row_lse.new_ones((input.shape[0],) if reduction == 0 else ())
        # Through _TransformGradient: a transform differentiating this tangent again (jacrev(jacfwd(...)),
        # jacfwd(jacfwd(...))) raises rather than taking the gradient for a constant.
        grad = _TransformGradient.apply(ones, *ctx.saved_tensors, *ctx.options[:4]).to(row_lse.dtype)
        tangent = (grad * input_tangent.to(row_lse.dtype)).sum(-1)
        if reduction != 0:
            tangent = tangent.sum()
        loss_dtype = row_lse.dtype if ctx.options[7] else input.dtype
        return tangent.to(loss_dtype), None, None, None


class _CompiledCrossEntropyTransformFunction(_CrossEntropyTransformFunction):
    """The same without forward mode, for torch.compile of torch.func.grad: dynamo refuses to trace an
    autograd.Function with a jvp of its own. Forward mode never comes here (_compiled_transform_road)."""

    jvp = torch.autograd.Function.jvp


# torch.compile of torch.func transforms over the losses. Dynamo traces an autograd.Function as a node with its
# backward only where it sees an argument that requires grad, and it judges that from the argument as it first
# saw it: torch.func.grad sets requires_grad on its inputs after that, so the loss was traced as its forward
# alone, which has no derivative, and the gradient came out as zeros (pytorch/pytorch#193279). A view of each
# argument is seen afresh. Dynamo also drops a custom jvp (#192985), cannot vmap the node it makes, and drops
# the derivative an autograd around the transform would need: those forms are refused with an error, which
# makes dynamo leave them to eager torch.func, where they are right (or raise, as eager does).


# Dynamo reads torch.func's levels from torch 2.7 on (pytorch/pytorch#144444).
_DYNAMO_READS_FUNCTORCH_LEVELS = torch.__version__ >= (2, 7)


def _functorch_levels():
    """(number of torch.func levels, the innermost one or None), constants to dynamo: a level's number is one
    more than the levels below it."""
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    if not _DYNAMO_READS_FUNCTORCH_LEVELS:
        return -1, None  # unknown: refused
    innermost = retrieve_current_functorch_interpreter()
    return (0, None) if innermost is None else (innermost.level(), innermost)


def _compiled_transform_road(loss, *tensors):
    """Under torch.compile (run by dynamo as it traces), how to apply a loss's transform Function: ("grad",
    views of the tensors, seen afresh) for one level of grad, vjp or jacrev, where the Function must have no
    jvp of its own; ("vmap", the tensors) for one level of vmap of a loss nobody differentiates (the ops'
    vmap rules). Anything else raises."""
    from torch._C._functorch import TransformType

    depth, innermost = _functorch_levels()
    if depth == 1:
        # Ordinary autograd around the transform (a tensor below level 1 requires grad: MAML's second order
        # through grad, autograd through vmap) would meet a derivative dynamo dropped: not traced.
        if innermost.key() == TransformType.Grad:
            unwrap = torch._C._functorch._unwrap_for_grad
            if not any(t is not None and unwrap(t, 1).requires_grad for t in tensors):
                return "grad", tuple(None if t is None else t.view_as(t) for t in tensors)
        elif innermost.key() == TransformType.Vmap:
            if not (torch.is_grad_enabled() and any(
                    t is not None and torch._C._functorch._unwrap_batched(t, 1)[0].requires_grad
                    for t in tensors)):
                return "vmap", tensors
    _refuse_compiled_transform(loss)


def _check_compiled_transform_backward(loss):
    """In a transform Function's backward under torch.compile: dynamo traces it within a compiled grad road, and
    as a frame of its own inside an eager transform (the others' fallback), where its gradient's node with a
    jvp would break the graph mid-frame: refused there, so the whole backward runs uncompiled."""
    from torch._C._functorch import TransformType

    depth, innermost = _functorch_levels()
    if depth != 0 and not (depth == 1 and innermost.key() == TransformType.Grad):
        _refuse_compiled_transform(loss)


def _refuse_compiled_transform(loss):
    if not _DYNAMO_READS_FUNCTORCH_LEVELS:
        what = f"on torch {torch.__version__} (< 2.7) torch.compile cannot trace torch.func transforms of the loss"
    else:
        what = ("torch.compile cannot trace this torch.func transform of the loss (more than one level of "
                "torch.func, e.g. vmap(grad), grad(vmap) or vmap(vmap); forward mode; or ordinary autograd "
                "around grad or vmap)")
    raise RuntimeError(
        f"{loss}: {what}: dynamo would drop the loss's derivative and return zeros (pytorch/pytorch#193279). "
        f"Without fullgraph=True torch.compile runs this part uncompiled, and right; with fullgraph=True, call "
        f"the transform outside the compiled function"
    )


class _TransformGradient(torch.autograd.Function):
    """The loss's gradient under torch.func, which always differentiates with create_graph: a node over
    everything the gradient depends on, raising when anything differentiates it (reverse or forward mode,
    e.g. torch.func.hessian). The op has no derivative of its own, and without this node an outer transform
    would see the gradient as constant and answer 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, input, target, weight, row_lse, denominator, reduction, ignore_index, label_smoothing,
                lse_square_scale):
        return _ops.cross_entropy_backward(
            grad_loss, input, target, weight, row_lse, denominator, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_grad):
        _raise_double_backward()

    @staticmethod
    def jvp(ctx, *tangents):
        _raise_double_backward()


def _gradient(ctx, grad_loss):
    reduction, ignore_index, label_smoothing, lse_square_scale = ctx.options[:4]
    input, target, weight, row_lse, denominator = ctx.saved_tensors
    return _ops.cross_entropy_backward(
        grad_loss, input, target, weight, row_lse, denominator, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
    )


# torch.is_autocast_enabled(device_type) is the documented test (torch >= 2.4); the any-device check in front
# keeps the ordinary call at one C call.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_transforms_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling


def _compiled_autograd_enabled() -> bool:
    """Whether this backward runs under compiled autograd (torch._dynamo.compiled_autograd, not imported
    until someone uses it): its graph runs, and is traced, with in_compiled_autograd_region set."""
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    return compiled_autograd is not None and bool(
        compiled_autograd.in_compiled_autograd_region or compiled_autograd.compiled_autograd_enabled
    )


class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy_with_lse` returns."""

    loss: Tensor
    """The loss, z-loss included, reduced as asked, in ``input``'s dtype (fp32 for bf16/fp16 input under
    autocast, as torch's)."""
    z_loss: Tensor
    """The z-loss term alone (``lse_square_scale · lse²`` over the rows that are not ignored), reduced like
    ``loss``; not differentiable (its gradient flows through ``loss``)."""
    lse: Tensor
    """Log-sum-exp of each row's logits, shape of the batch (``target``'s for class indices), fp32 (fp64 for
    fp64 input); not differentiable."""


# Positions per batch entry from which (N, C, d1, …, dK) logits keep their layout (_rows_view). The ops' forward
# with the gradient over 4M logits, 2 threads, Zen 4 (benchmarks/bench_segmentation_loss.py --probes;
# results/cpu-segmentation-loss-probes-2026-11-29.txt), against the same logits copied into rows: at 1000 classes
# 0.33-0.51x the time from 32 positions on, up to 2.8x below (bf16 at 16: 1.32x); at 21 classes 0.13-0.47x.
_MIN_POSITIONS = 32
# On CUDA the layout's kernels run a thread per row (cross_entropy.cu), so fewer rows than this would leave most of a
# GPU idle (an H100 holds 270K resident threads), where the rows kernels spread each row over a warp or a block.
# Not yet measured on a GPU.
_MIN_CUDA_POSITION_ROWS = 1 << 16


def _rows_view(input: Tensor, target: Tensor, rows_only: bool = False) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Maps torch's input shapes (C), (N, C), (N, C, d1, …, dK) onto what the ops take and checks the target:
    (rows, C), or for (N, C, d1, …, dK) the (N, C, d1·…·dK) layout (a view of contiguous logits), whose kernels
    read each position's classes at their stride where they are. ``rows_only``: always (rows, C) (torch.func's
    vmap rules fold a batch into the rows)."""
    dim = input.dim()
    prob = target.is_floating_point()
    if not prob and target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"cross_entropy: target must hold class indices (int64 or int32) or class probabilities "
            f"(floating point), got {target.dtype}"
        )
    if dim == 2:
        if prob:
            if target.shape != input.shape:
                raise ValueError(
                    f"cross_entropy: probability target has shape {tuple(target.shape)} but input has "
                    f"{tuple(input.shape)}; they must match"
                )
        elif target.dim() != 1 or target.shape[0] != input.shape[0]:
            if target.dim() == 1:
                raise ValueError(
                    f"cross_entropy: target has {target.shape[0]} rows but input has {input.shape[0]}"
                )
            raise ValueError(
                f"cross_entropy: class-index target must be 1-D (N,) for input of shape {tuple(input.shape)}, "
                f"got shape {tuple(target.shape)}"
            )
        return input, target, (input.shape[0],)
    if dim == 1:
        expected = input.shape if prob else torch.Size([])
        if target.shape != expected:
            raise ValueError(
                f"cross_entropy: for 1-D input (C,) the target must have shape {tuple(expected)}, "
                f"got {tuple(target.shape)}"
            )
        return input.unsqueeze(0), target.unsqueeze(0) if prob else target.reshape(1), ()
    if dim == 0:
        raise ValueError("cross_entropy: input must have a class dimension: (C), (N, C) or (N, C, d1, ..., dK)")
    classes = input.shape[1]
    batch_shape = (input.shape[0],) + tuple(input.shape[2:])
    expected = input.shape if prob else torch.Size(batch_shape)
    if target.shape != expected:
        raise ValueError(
            f"cross_entropy: target has shape {tuple(target.shape)} but input of shape {tuple(input.shape)} "
            f"needs {tuple(expected)}"
        )
    # Channels-last logits (unit class stride) are rows already, as a view; others keep their layout, (N, C, d…)
    # as (N, C, positions), instead of a copy into rows (a pass over the logits, and one more over the gradient
    # wherever the next op wants it contiguous); the ops make a non-contiguous one contiguous (a copy). The CPU
    # kernels take that layout two SIMD registers of positions at a time (32 fp32 with AVX-512), so fewer than
    # _MIN_POSITIONS positions per batch entry go into rows, a copy; so do small batches on CUDA, and all under
    # torch.func. The gradient flows back through these views.
    positions = math.prod(input.shape[2:])
    if (rows_only or (input.stride(1) == 1 and classes > 1) or positions < _MIN_POSITIONS
            or (input.is_cuda and input.shape[0] * positions < _MIN_CUDA_POSITION_ROWS)):
        rows = input.movedim(1, -1).reshape(-1, classes)
        target = target.movedim(1, -1).reshape(-1, classes) if prob else target.reshape(-1)
        return rows, target, batch_shape
    layout = input.reshape(input.shape[0], classes, positions)  # explicit: a -1 cannot be inferred when N is 0
    target = target.reshape(layout.shape) if prob else target.reshape(input.shape[0], positions)
    return layout, target, batch_shape


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                   inplace_backward, want_lse):
    code = _REDUCTION_CODES.get(reduction)
    if code is None:
        raise ValueError(f"cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    # Under autocast torch computes this loss in fp32 (cross_entropy is on autocast's fp32 list) and returns
    # it in fp32; the kernels already compute in opmath, so only the loss's dtype changes, with no fp32 copy
    # of the logits.
    try:
        opmath_loss = _any_autocast() and torch.is_autocast_enabled(input.device.type)
        common = input.dim() == 2 and target.dim() == 1 and not target.is_floating_point()
    except AttributeError:  # not tensors: say so, as torch's cross_entropy does
        for name, value in (("input", input), ("target", target)):
            if not isinstance(value, Tensor):
                raise TypeError(f"cross_entropy: {name} must be a Tensor, got {type(value).__name__}") from None
        raise
    if common:
        # The common (N, C) logits with class indices: the op checks the rest and names the argument.
        if not (inplace_backward or want_lse or _is_compiling() or _transforms_active()):
            # The training loop's common case: the same ops as _CrossEntropyFunction under an autograd node
            # in C++ (csrc/cross_entropy_autograd.cpp), which at small sizes costs a fraction of a Python one.
            # torch.compile and torch.func transforms trace _CrossEntropyFunction instead.
            if _has_torch_function(input, target, weight):
                return _cross_entropy_loss_op(input, target, weight, reduction=code, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                                              opmath_loss=opmath_loss)
            return _cross_entropy_loss(input, target, weight, code, ignore_index, label_smoothing,
                                       lse_square_scale, opmath_loss)
        rows, target_rows, batch_shape = input, target, None
    else:
        rows, target_rows, batch_shape = _rows_view(input, target, rows_only=_transforms_active())
        if inplace_backward and (rows.stride(-1) != 1 if rows.dim() == 2 else not rows.is_contiguous()):
            rows = rows.contiguous()
    options = (code, ignore_index, label_smoothing, lse_square_scale, inplace_backward,
               input.requires_grad and torch.is_grad_enabled(), want_lse, opmath_loss)
    if _transforms_active():
        function = _CrossEntropyTransformFunction
        if _is_compiling():
            road, (rows, weight) = _compiled_transform_road("cross_entropy", rows, weight)
            if road == "grad":
                function = _CompiledCrossEntropyTransformFunction
        out = function.apply(rows, target_rows, weight, _Options(options))
        out = out[:3] if want_lse else out[0]
    else:
        out = _CrossEntropyFunction.apply(rows, target_rows, weight, options)
    if not want_lse:
        if code == 0 and batch_shape is not None and len(batch_shape) != 1:
            out = out.reshape(batch_shape)
        return out
    loss, z_loss, row_lse = out
    if batch_shape is None:
        batch_shape = (input.shape[0],)
    if code == 0 and len(batch_shape) != 1:
        loss = loss.reshape(batch_shape)
        z_loss = z_loss.reshape(batch_shape)
    return CrossEntropyOutput(loss, z_loss, row_lse.sum(1).reshape(batch_shape))


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    inplace_backward: bool = False,
) -> Tensor:
    r"""Cross-entropy between logits and targets, fused. When ``input`` needs a gradient, the forward writes
    it too, each row read once from memory and once more from cache, for a loss gradient of 1: nothing is
    left to do for ``loss.backward()``, and any other loss gradient (a GradScaler scale) is applied before
    the gradient's one rounding, by recomputing it from the logits (on CPU a power-of-two scale multiplies
    bf16/fp32/fp64 gradients instead, which is exact for them). The gradient is then the only N×C buffer,
    alive from the forward to the backward. Otherwise the forward reads the logits once.

    Same arguments, shapes and results as :func:`torch.nn.functional.cross_entropy`; the math runs in fp32
    for bf16/fp16 input (fp64 for fp64) and the loss is returned in ``input``'s dtype, or under autocast in
    fp32 (fp64 for fp64), as torch's. Works under :mod:`torch.func` transforms (``grad``, ``vmap``, ``jacrev``,
    ``jvp``); differentiating the gradient again (double backward, Hessians) raises.

    (N, C, d…) logits (a segmentation loss) are read where they lie, each position's classes at their stride, when
    they have at least 32 positions per sample (on CUDA at least 65536 positions in all; non-contiguous ones are
    made contiguous first, a copy), and the gradient comes back in their layout; channels-last logits are rows
    already; (N, C, d…) logits with fewer positions are copied into rows.

    Args:
        input: logits, shape :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`.
        target: class indices (int64 or int32), shape :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)`,
            values in :math:`[0, C)` or ``ignore_index``; or class probabilities of ``input``'s shape and dtype.
        weight: rescaling weight per class, shape :math:`(C)`.
        size_average, reduce: deprecated, as in torch (use ``reduction``).
        ignore_index: class-index target value that contributes neither loss nor gradient (and is left out of
            the mean's denominator). Not used with probability targets.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``. ``'mean'`` divides by the total weight of the rows that
            are not ignored (probability targets: by the number of rows); all rows ignored gives NaN, as torch.
        label_smoothing: :math:`\varepsilon \in [0, 1]`, torch's smoothing toward the uniform distribution.
        lse_square_scale: z-loss scale :math:`z`: adds :math:`z \cdot \mathrm{lse}^2` to each row that is not
            ignored (unweighted, reduced with the loss). Use :func:`cross_entropy_with_lse` to read it apart.
        inplace_backward: write the gradient over ``input``'s storage instead of allocating one (peak memory
            stays at the logits alone, and no fresh N×C buffer is paged in). Only when nothing else needs the
            logits after this loss: when ``input`` needs a gradient, the logits are overwritten by this call
            itself, so other users of the same tensor (or of a view of it) see the gradient from then on,
            and an autograd node that saved them raises at backward. One backward per forward. No effect on
            the values, except that a bf16/fp32/fp64 gradient is rounded twice for a loss gradient other than
            1 (fp16, the dtype of loss scaling, is written over the logits by the backward instead, rounded
            once). (N, C, d…) inputs are written over where they are read in place: contiguous ones with at
            least 32 positions per sample (on CUDA also at least 65536 positions in all), and channels-last
            ones; others are copied first, and the gradient is written over that copy, which saves nothing. No
            effect under :mod:`torch.func` transforms.

    Returns:
        The loss: a scalar, or shaped like the batch for ``reduction='none'``.

    Raises:
        ValueError / TypeError: on shapes, dtypes or options torch would reject, naming the argument.
        IndexError: on CPU, a class-index target outside :math:`[0, C)` that is not ``ignore_index``.
        On CUDA such a row's loss is NaN and the next fused_train cross-entropy call on that device raises.

    On CPU a large loss is dominated by paging in the fresh N×C gradient (torch's own loss pages in two
    such buffers); ``THP_MEM_ALLOC_ENABLE=1`` (torch's switch for transparent huge pages in its CPU
    allocator) makes that several times cheaper for both, and ``inplace_backward`` avoids it.

    Example::

        >>> logits = torch.randn(8, 100, requires_grad=True)
        >>> target = torch.randint(0, 100, (8,))
        >>> loss = fused_train.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    return _cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, inplace_backward,
        False,
    )


def cross_entropy_with_lse(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    inplace_backward: bool = False,
) -> CrossEntropyOutput:
    """:func:`cross_entropy` that also returns the z-loss term and the per-row log-sum-exp, from the same
    pass: ``loss, z_loss, lse = cross_entropy_with_lse(logits, target, lse_square_scale=1e-4)``.
    Arguments as :func:`cross_entropy` (without the deprecated ones)."""
    return _cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, inplace_backward,
        True,
    )


def _op_options(options) -> dict:
    """The linear cross-entropy ops' keyword options from linear_cross_entropy's options tuple."""
    names = ("reduction", "ignore_index", "label_smoothing", "lse_square_scale", "softcap", "chunk_rows",
             "opmath_weight_grad")
    return dict(zip(names, options))


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """linear + cross-entropy over (N, H) rows (csrc/linear_cross_entropy.cpp). For a reduced loss the forward
    computes the gradients asked for, for a loss gradient of 1, chunk by chunk while each chunk's logits are
    at hand; the backward hands them over (nothing to do for ``loss.backward()`` on CPU), or multiplies them by
    any other loss gradient (rounded twice then for bf16, unless it is a power of two). fp16 leaves them to the
    backward, which applies the loss gradient (GradScaler's scale) before rounding, as does
    ``reduction='none'`` (one loss gradient per row): it recomputes them from the saved inputs and each row's
    log-sum-exp, at the cost of the logits' GEMM once more. So does a second backward through the same graph
    (``retain_graph=True``)."""

    @staticmethod
    def forward(ctx, input, linear_weight, target, linear_bias, weight, options):
        reduction, *_, opmath, wanted = options
        in_forward = reduction != 0 and input.dtype != torch.float16 and any(wanted)
        loss, row_lse, denominator, *grads = _ops.linear_cross_entropy_forward(
            input, linear_weight, target, linear_bias, weight, **_op_options(options),
            input_grad=in_forward and wanted[0], linear_weight_grad=in_forward and wanted[1],
            linear_bias_grad=in_forward and wanted[2], opmath_loss=opmath,
        )
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, row_lse, denominator)
        ctx.options = options
        ctx.grads = grads if in_forward else None  # handed over, not read: not saved tensors
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not torch.is_grad_enabled():
            return _linear_backward(ctx, grad_loss)
        with torch.no_grad():  # create_graph=True: first-order gradients that refuse a second derivative
            grads = _linear_backward(ctx, grad_loss)
        return tuple(None if g is None else _NoDoubleBackward.apply(g.detach().requires_grad_()) for g in grads)


def _linear_backward(ctx, grad_loss):
    needs = ctx.needs_input_grad
    for position, name in ((4, "weight"), (2, "target")):
        if needs[position]:
            raise RuntimeError(
                f"linear_cross_entropy: the derivative for '{name}' is not implemented (pass a {name} that does "
                f"not require grad, e.g. {name}.detach())"
            )
    grads = ctx.grads
    if grads is not None and (_transforms_active() or _compiled_autograd_enabled()
                              or (not _is_compiling() and _is_batched(grad_loss))):
        grads = None  # as in _backward: a batched grad_loss, or a replay that would reuse them, recomputes
    if grads is not None:
        ctx.grads = None
        if _is_compiling() or not _ops.cross_entropy_grad_loss_is_one(grad_loss):
            scale = grad_loss.reshape(())
            for g in grads:
                g.mul_(scale)
    else:
        grads = _ops.linear_cross_entropy_backward(
            grad_loss, *ctx.saved_tensors, **_op_options(ctx.options), input_grad=needs[0],
            linear_weight_grad=needs[1], linear_bias_grad=needs[3],
        )
    grad_input, grad_weight, grad_bias = grads
    return (grad_input if needs[0] else None, grad_weight if needs[1] else None, None,
            grad_bias if needs[3] else None, None, None)


class _LinearCrossEntropyTransformFunction(torch.autograd.Function):
    """The same under torch.func transforms (grad, vjp, vmap, jacrev): functional ops in the form functorch
    needs, the gradients computed in the backward, vmapped through the ops' own vmap rules (_ops.py): the
    samples' rows folded into one call where linear_weight is shared, one call per sample otherwise."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, linear_weight, target, linear_bias, weight, options):
        *_, opmath, _ = options
        loss, row_lse, denominator, *_ = _ops.linear_cross_entropy_forward(
            input, linear_weight, target, linear_bias, weight, **_op_options(options), input_grad=False,
            linear_weight_grad=False, linear_bias_grad=False, opmath_loss=opmath,
        )
        return loss, row_lse, denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, linear_weight, target, linear_bias, weight, options = inputs
        _, row_lse, denominator = output
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, row_lse, denominator)
        ctx.options = options
        ctx.mark_non_differentiable(row_lse, denominator)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if _is_compiling():
            _check_compiled_transform_backward("linear_cross_entropy")
        needs = ctx.needs_input_grad
        if needs[2] or needs[4]:
            return _linear_backward(ctx, grad_loss)  # raises, naming the argument
        grads = _LinearTransformGradient.apply(grad_loss, *ctx.saved_tensors, ctx.options, _Options(needs))
        return (grads[0] if needs[0] else None, grads[1] if needs[1] else None, None,
                grads[2] if needs[3] else None, None, None)


class _LinearTransformGradient(torch.autograd.Function):
    """The gradients under torch.func, which differentiates with create_graph: a node that raises when anything
    differentiates them again (torch.func.hessian, jacrev of grad), rather than an outer transform seeing a
    constant and answering 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, input, linear_weight, target, linear_bias, weight, row_lse, denominator, options, needs):
        return _ops.linear_cross_entropy_backward(
            grad_loss, input, linear_weight, target, linear_bias, weight, row_lse, denominator,
            **_op_options(options), input_grad=needs[0], linear_weight_grad=needs[1], linear_bias_grad=needs[3],
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grad_grads):
        _raise_double_backward()

    @staticmethod
    def jvp(ctx, *tangents):
        _raise_double_backward()


def _is_batched(t: Tensor) -> bool:
    """Whether t is a vmap batched tensor: autograd.grad(..., is_grads_batched=True) hands one to a backward
    with legacy vmap's Batched dispatch key, which functorch's is_batchedtensor does not see and Python's
    DispatchKey does not name."""
    return "Batched" in str(torch._C._dispatch_keys(t))


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    options: "torch.nn.LinearCrossEntropyOptions | None" = None,
) -> Tensor:
    r"""``cross_entropy(linear(input, linear_weight, linear_bias), target)`` without the (N, V) logits: the
    language model's last layer and loss, as :func:`torch.nn.functional.linear_cross_entropy`, in chunks of
    rows. Each chunk's logits come from one GEMM (ATen: MKL/oneDNN on CPU, cuBLAS on CUDA) into a buffer reused
    by every chunk, the fused loss turns them into the loss and their gradient in one pass, and two more GEMMs
    carry the gradient to ``input`` and ``linear_weight``: linear + cross_entropy's work, with one chunk of
    logits (a tenth of N×V within 24–64 MiB, at least 192 rows; bf16 on CPU: a twelfth however large) in memory
    instead of N×V.

    Arguments, shapes and results as :func:`torch.nn.functional.linear_cross_entropy` (and
    :func:`cross_entropy` for the loss options); the loss in ``input``'s dtype, or fp32 under autocast, which
    casts ``input``, ``linear_weight`` and ``linear_bias`` to its dtype as it would for ``linear``.

    Args:
        input: :math:`(*, H)`, e.g. a causal LM's hidden states (batch, time, H).
        linear_weight: :math:`(V, H)`, the LM head's weight (tied to the input embedding or not); or
            :math:`(V, *out_features, H)` for torch's K-dimensional loss: each position of ``out_features`` a
            :math:`(V, H)` head over the same rows (logits :math:`(*, V, *out_features)`), each through the same
            op, their losses summed in opmath and a mean divided once.
        target: class indices of shape :math:`(*)` (int64 or int32, values in :math:`[0, V)` or
            ``ignore_index``), or probabilities :math:`(*, V)` (floating point; read in ``input``'s dtype);
            K-dimensional: :math:`(*, *out_features)` or :math:`(*, V, *out_features)`.
        linear_bias: :math:`(V)`, or :math:`(V, *out_features)`.
        weight, reduction, label_smoothing, lse_square_scale: as :func:`cross_entropy`.
        ignore_index: as :func:`cross_entropy`; ``None`` means -100, as torch's.
        softcap: Gemma-style logit capping: the logits become ``softcap · tanh(logits / softcap)`` before the
            loss (gradient included). ``None``: no capping.
        chunk_size: rows per chunk; ``None``: a tenth of the N×V logits within 24–64 MiB (bf16 on CPU: a twelfth
            however large, at least 12 MiB), at least 192 rows. On the tiled road below, rows per chunk and
            classes per block of the tiles; ``None``: as many of each (a multiple of 64, within 64–1024) as fit
            the tiles' fp32 buffers in a twelfth of the N×V logits in ``input``'s dtype.
        options: torch's :class:`torch.nn.LinearCrossEntropyOptions` (torch >= 2.14), resolved as torch resolves
            it, for what it sets here: the rows per chunk (``batch_chunk_size``, or with ``chunking_method``
            ``None`` and no ``batch_chunk_size`` one chunk, ``"aspect_ratio[:k]"`` torch's size, ``"auto"`` ours
            as ``chunk_size=None``), and, for bf16/fp16, where torch keeps an fp32 scratch of ``linear_weight``'s
            gradient (resolved ``acc_dtype`` fp32 with ``"accurate"``, or ``"compact"`` off CUDA; ``"auto"``:
            ``"accurate"`` with fp32 on CPU, ``"compact"`` on CUDA), that fp32 buffer sums the chunks' parts
            and is rounded once at the end, where torch rounds the running sum in the input's dtype once per
            chunk (as this op does otherwise): 4 bytes per element of ``linear_weight``. A loss gradient other
            than 1 then multiplies the rounded gradient, as without options. ``allow_retain_graph`` changes
            nothing: a second backward always works here (it recomputes). ``None`` (the default): chunking as
            ``chunk_size`` says, the sum in the input's dtype.

    The gradients of a reduced loss are computed in the forward (for a loss gradient of 1) and applied in the
    backward; ``reduction='none'``, fp16 and a second backward recompute them from the inputs, costing the logits'
    GEMM once more. On CPU, bf16 GEMMs run in bf16 (oneDNN) where the CPU has bf16 dot products (AVX512_BF16:
    ``fused_train.build_info()["cpu_bf16_dot_product"]``), the logits rounded to bf16 as torch's bf16 ``linear``
    rounds them and the weight's gradient rounded once per chunk of rows (about twelve chunks). Elsewhere, for fp16,
    and with ``FUSED_TRAIN_CPU_HALF_GEMMS=fp32``, they run in fp32 (CPUs without half-precision dot products emulate
    those GEMMs, many times slower), over tiles of rows × classes whose rows of ``input`` and ``linear_weight`` are
    converted as each tile needs them: a rows pass (each row's log-sum-exp online over the class blocks, its loss
    and ``input``'s gradient) and a classes pass (``linear_weight``'s and ``linear_bias``'s gradients, block by
    block), four GEMMs instead of three (five with probability targets, or softcap with label smoothing), each
    gradient summed in fp32 and rounded once, and no fp32 copy of ``linear_weight`` or its gradient. Works with
    :func:`torch.compile`, and with :func:`torch.func.grad`, ``vjp``, ``jacrev``, ``vmap`` (per-sample gradients as
    ``vmap(grad(...))``; with one ``linear_weight`` the samples' rows fold into one call, while per-sample gradients
    of ``linear_weight`` or ``linear_bias`` and a batch of heads take one call per sample); not forward mode
    (``jvp``, ``jacfwd``), and differentiating the gradient again raises.
    """
    code = _REDUCTION_CODES.get(reduction)
    if code is None:
        raise ValueError(f"linear_cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    for name, value in (("input", input), ("linear_weight", linear_weight), ("target", target),
                        ("linear_bias", linear_bias), ("weight", weight)):
        if not isinstance(value, Tensor) and not (value is None and name in ("linear_bias", "weight")):
            raise TypeError(f"linear_cross_entropy: {name} must be a Tensor, got {type(value).__name__}")
    if linear_weight.dim() < 2:
        raise ValueError(
            f"linear_cross_entropy: linear_weight must have shape (num_classes, *out_features, in_features), got "
            f"shape {tuple(linear_weight.shape)}"
        )
    classes, hidden, out_features = linear_weight.shape[0], linear_weight.shape[-1], linear_weight.shape[1:-1]
    if input.dim() == 0 or input.shape[-1] != hidden:
        raise ValueError(
            f"linear_cross_entropy: input must have shape (*, in_features={hidden}), got {tuple(input.shape)}"
        )
    if out_features and input.dim() < 2:
        raise ValueError(
            f"linear_cross_entropy: the K-dimensional loss of linear_weight of shape {tuple(linear_weight.shape)} "
            f"needs batched input (N, {hidden}), got shape {tuple(input.shape)}"
        )
    if out_features and linear_bias is not None and linear_bias.shape != (classes, *out_features):
        raise ValueError(
            f"linear_cross_entropy: linear_bias must have shape {(classes, *out_features)} for linear_weight of "
            f"shape {tuple(linear_weight.shape)}, got {tuple(linear_bias.shape)}"
        )
    batch_shape = input.shape[:-1]
    prob = target.is_floating_point()
    expected = batch_shape + (classes,) + out_features if prob else batch_shape + out_features
    if target.shape != expected:
        kind = "probability" if prob else "class-index"
        raise ValueError(
            f"linear_cross_entropy: {kind} target must have shape {tuple(expected)} for input of shape "
            f"{tuple(input.shape)} and linear_weight of shape {tuple(linear_weight.shape)}, got {tuple(target.shape)}"
        )
    if softcap is None:
        softcap = 0.0
    elif not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and 0 < softcap < float("inf")):
        raise ValueError(f"linear_cross_entropy: softcap must be a positive finite number or None, got {softcap!r}")
    if chunk_size is None:
        chunk_size = 0
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int or None, got {chunk_size!r}")
    if ignore_index is None:
        ignore_index = -100
    opmath_loss = (_any_autocast() and torch.is_autocast_enabled(input.device.type)
                   and input.dtype in _AUTOCAST_CASTS)
    if opmath_loss:
        # autocast would run linear in its dtype (fp64 it leaves alone) and the loss in fp32, returned in fp32.
        dtype = _autocast_dtype(input.device.type)
        input, linear_weight, linear_bias = (
            t.to(dtype) if t is not None and t.dtype in _AUTOCAST_CASTS else t
            for t in (input, linear_weight, linear_bias)
        )
    rows_count = batch_shape.numel()
    chunk_size, opmath_weight_grad = _read_torch_options(options, chunk_size, rows_count, classes, hidden,
                                                         input.dtype, input.device)
    rows = input.reshape(rows_count, hidden)
    grad = torch.is_grad_enabled()
    wanted = (grad and rows.requires_grad, grad and linear_weight.requires_grad,
              grad and linear_bias is not None and linear_bias.requires_grad)
    options = (code, ignore_index, float(label_smoothing), float(lse_square_scale), float(softcap), chunk_size,
               opmath_weight_grad, opmath_loss, wanted)
    if out_features:
        return _per_position(rows, linear_weight, target, linear_bias, weight, options, batch_shape)
    target_rows = target.reshape(rows_count, classes) if prob else target.reshape(rows_count)
    loss = _linear_loss(rows, linear_weight, target_rows, linear_bias, weight, options)
    return loss.reshape(batch_shape) if code == 0 else loss


def _linear_loss(rows, linear_weight, target_rows, linear_bias, weight, options) -> Tensor:
    """The loss over (N, H) rows and a (V, H) linear_weight through the autograd Function of the moment."""
    if _transforms_active():
        if _is_compiling():
            _, (rows, linear_weight, linear_bias, weight) = _compiled_transform_road(
                "linear_cross_entropy", rows, linear_weight, linear_bias, weight)
        return _LinearCrossEntropyTransformFunction.apply(rows, linear_weight, target_rows, linear_bias, weight,
                                                          _Options(options))[0]
    return _LinearCrossEntropyFunction.apply(rows, linear_weight, target_rows, linear_bias, weight, options)


def _per_position(rows, linear_weight, target, linear_bias, weight, options, batch_shape) -> Tensor:
    """The K-dimensional loss of linear_weight (C, *out_features, H): each position of out_features is a (C, H)
    head over the same rows, its loss the 2-D one, as torch's logits (N, C, *out_features) make it. Each position
    is summed (or kept per row) in opmath; a mean divides the total once, by the weights of every kept target of
    every position (the count for probabilities), as torch's cross_entropy does."""
    code, ignore_index, *_, opmath_loss, wanted = options
    classes, hidden, out_features = linear_weight.shape[0], linear_weight.shape[-1], linear_weight.shape[1:-1]
    positions, n = math.prod(out_features), rows.shape[0]
    if positions == 0:
        raise ValueError(f"linear_cross_entropy: linear_weight's out_features {tuple(out_features)} hold no position")
    heads = linear_weight.reshape(classes, positions, hidden).unbind(1)
    biases = (linear_bias.reshape(classes, positions).unbind(1) if linear_bias is not None
              else (None,) * positions)
    prob = target.is_floating_point()
    flat_target = target.reshape(n, classes, positions) if prob else target.reshape(n, positions)
    each = (0 if code == 0 else 2, *options[1:7], True, wanted)  # per row or summed, the loss in opmath
    losses = torch.stack([_linear_loss(rows, head, t, b, weight, each)
                          for head, t, b in zip(heads, flat_target.unbind(-1), biases)], dim=-1)
    loss_dtype = losses.dtype if opmath_loss else rows.dtype
    if code == 0:
        return losses.reshape(batch_shape + out_features).to(loss_dtype)
    total = losses.sum()
    if code == 1:
        if prob:
            any_kept, denominator = total.new_tensor(n > 0, dtype=torch.bool), total.new_tensor(n * positions)
        else:
            kept = flat_target != ignore_index
            counted = kept if weight is None else torch.where(
                kept, weight.to(total.dtype)[flat_target.clamp(0, classes - 1)], 0.0)
            any_kept, denominator = kept.any(), counted.sum(dtype=total.dtype)
        # Without a target that counts the mean is NaN and the gradients 0, as torch's; the factor the positions'
        # gradients get is then 0, not 1/0.
        total = total * torch.where(any_kept, 1 / denominator, 0.0) + torch.where(any_kept, 0.0, float("nan"))
    return total.to(loss_dtype)


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


def _read_torch_options(options, chunk_size: int, rows: int, classes: int, hidden: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[int, bool]:
    """(chunk_size, opmath_weight_grad) from torch's LinearCrossEntropyOptions, resolved as torch's
    ``LinearCrossEntropyOptions._adjust`` resolves them (chunk rows, acc_policy, acc_dtype); chunk_size 0: ours."""
    if options is None:
        return chunk_size, False
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_type is None or not isinstance(options, options_type):
        wanted = ("a torch.nn.LinearCrossEntropyOptions or None" if options_type is not None
                  else f"None (torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions; it came in 2.14)")
        raise TypeError(f"linear_cross_entropy: options must be {wanted}, got {type(options).__name__}")
    method, size = options.chunking_method, options.batch_chunk_size
    if method == "auto" and size is None:
        rows_per_chunk = None  # ours
    elif method in ("auto", None):
        rows_per_chunk = max(1, rows if size is None else min(size, rows))
    else:  # "aspect_ratio" or "aspect_ratio:k", as torch sizes it
        if hidden == 0:
            raise ValueError(f"linear_cross_entropy: options.chunking_method {method!r} needs in_features > 0")
        factor = int(method.split(":", 1)[1]) if ":" in method else 1
        per_chunk = -(-rows // -(-classes // hidden))
        rows_per_chunk = min((1 << (per_chunk - 1).bit_length()) // factor, rows)
        if size is not None and size != rows_per_chunk:
            raise ValueError(
                f"linear_cross_entropy: options.batch_chunk_size (={size}) and options.chunking_method "
                f"({method!r}) give different chunk sizes ({size} vs {rows_per_chunk}); pass only one")
        rows_per_chunk = max(1, rows_per_chunk)
    if rows_per_chunk is not None:
        if chunk_size not in (0, rows_per_chunk):
            raise ValueError(
                f"linear_cross_entropy: chunk_size (={chunk_size}) and options give different chunk sizes "
                f"({chunk_size} vs {rows_per_chunk}); pass only one")
        chunk_size = rows_per_chunk
    policy, acc_dtype = options.acc_policy, options.acc_dtype
    if acc_dtype is None:  # torch: fp32 under "auto" where mixed-precision GEMMs exist (CPU; CUDA is "compact")
        acc_dtype = torch.float32 if policy == "auto" and dtype in _HALF and device.type == "cpu" else dtype
    if acc_dtype != dtype and not (dtype in _HALF and acc_dtype == torch.float32):
        raise ValueError(
            f"linear_cross_entropy: options.acc_dtype must be None, the input's dtype ({dtype}) or, for fp16/bf16 "
            f"input, torch.float32; got {acc_dtype}")
    if policy == "auto":
        policy = "accurate" if device.type == "cpu" and dtype in _HALF else "compact"
    # Where torch keeps an acc_dtype (fp32) scratch of linear_weight's gradient ("accurate", and "compact" off
    # CUDA) and adds each chunk's part from it into the gradient in its own dtype, that buffer holds the sum here,
    # rounded once at the end.
    opmath_weight_grad = acc_dtype != dtype and (policy == "accurate" or device.type != "cuda")
    return chunk_size, opmath_weight_grad


def _autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
