"""One typed wrapper per fused_train op, and the fake (meta) kernels torch.compile traces with.

The schemas live in csrc/registration.cpp; the kernels in csrc/cpu and csrc/cuda. The optimizer ops
mutate their inputs and return nothing, so their fake kernels only have to accept the arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.fused_train


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    zero_grad: bool,
    lr_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    state_steps: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
    rounding_offsets: list[int] | None = None,
) -> None:
    """One SGD step over same-device, same-dtype params; see :class:`fused_train.optim.SGD`.

    ``momentum_buffers`` is empty when ``momentum == 0``; with ``is_first_step`` the buffers are
    overwritten with the first gradient (torch's ``clone`` on first use). ``zero_grad`` writes zeros
    into each gradient after reading it. ``grad_scale``/``found_inf`` come from GradScaler: grads are
    divided by ``grad_scale`` and the whole step is skipped when ``found_inf`` is nonzero.
    ``rounding_seeds`` (bf16 params: one int64 one-element tensor each) rounds the update into the param
    stochastically; ``state_steps`` are then its counters, advanced by the op. ``rounding_offsets`` (with the
    seeds, one int per param; default all 0) is the index, modulo 2^64, whose bits each param's element 0 draws:
    a shard's first element's index in its whole tensor.
    """
    _ops.sgd_step_.default(
        params, grads, momentum_buffers, state_steps if state_steps is not None else [], lr=lr, momentum=momentum,
        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        is_first_step=is_first_step, zero_grad=zero_grad, lr_tensor=lr_tensor, grad_scale=grad_scale,
        found_inf=found_inf, rounding_seeds=rounding_seeds, rounding_offsets=rounding_offsets,
    )


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    zero_grad: bool,
    lr_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding_seeds: list[Tensor] | None = None,
    rounding_offsets: list[int] | None = None,
) -> None:
    """One Adam/AdamW step; see :class:`fused_train.optim.Adam`. Advances each ``state_steps`` entry by
    one inside the op. ``max_exp_avg_sqs`` is empty unless ``amsgrad``. ``rounding_seeds`` and
    ``rounding_offsets``: as in :func:`sgd_step_`."""
    _ops.adam_step_.default(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
        beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay, zero_grad=zero_grad, lr_tensor=lr_tensor,
        grad_scale=grad_scale, found_inf=found_inf, rounding_seeds=rounding_seeds, rounding_offsets=rounding_offsets,
    )


def adam8bit_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_codes: list[Tensor],
    exp_avg_absmax: list[Tensor],
    exp_avg_sq_codes: list[Tensor],
    exp_avg_sq_absmax: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    zero_grad: bool,
    lr_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding_seeds: list[Tensor] | None = None,
    rounding_offsets: list[int] | None = None,
) -> None:
    """One Adam/AdamW step on 8-bit blockwise state; see :class:`fused_train.optim.Adam8bit`. Each moment is uint8
    codes of the param's shape and one fp32 absmax per 256 elements (contiguous, any shape of that many: an FSDP2
    shard's is (rows, row elements / 256)); params are float32, bfloat16 or float16. ``rounding_seeds`` and
    ``rounding_offsets``: as in :func:`sgd_step_`."""
    _ops.adam8bit_step_.default(
        params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, state_steps, lr=lr,
        beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay, zero_grad=zero_grad, lr_tensor=lr_tensor,
        grad_scale=grad_scale, found_inf=found_inf, rounding_seeds=rounding_seeds, rounding_offsets=rounding_offsets,
    )


def rmsprop_step_(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    zero_grad: bool,
    lr_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding_seeds: list[Tensor] | None = None,
    rounding_offsets: list[int] | None = None,
) -> None:
    """One RMSprop step; see :class:`fused_train.optim.RMSprop`. ``grad_avgs`` is empty unless
    ``centered``, ``momentum_buffers`` empty unless ``momentum > 0``. ``rounding_seeds`` and ``rounding_offsets``: as
    in :func:`sgd_step_`."""
    _ops.rmsprop_step_.default(
        params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr=lr, alpha=alpha, eps=eps,
        weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
        zero_grad=zero_grad, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        rounding_seeds=rounding_seeds, rounding_offsets=rounding_offsets,
    )


def sgd8bit_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_codes: list[Tensor],
    momentum_buffer_absmax: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    zero_grad: bool,
    lr_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    state_steps: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
    rounding_offsets: list[int] | None = None,
) -> None:
    """One SGD step with an 8-bit momentum buffer (``momentum`` nonzero); see :class:`fused_train.optim.SGD8bit` and,
    for the arguments, :func:`sgd_step_` and :func:`adam8bit_step_`."""
    _ops.sgd8bit_step_.default(
        params, grads, momentum_buffer_codes, momentum_buffer_absmax, state_steps if state_steps is not None else [],
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize, is_first_step=is_first_step, zero_grad=zero_grad, lr_tensor=lr_tensor,
        grad_scale=grad_scale, found_inf=found_inf, rounding_seeds=rounding_seeds, rounding_offsets=rounding_offsets,
    )


def rmsprop8bit_step_(
    params: list[Tensor],
    grads: list[Tensor],
    square_avg_codes: list[Tensor],
    square_avg_absmax: list[Tensor],
    momentum_buffer_codes: list[Tensor],
    momentum_buffer_absmax: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    maximize: bool,
    zero_grad: bool,
    lr_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding_seeds: list[Tensor] | None = None,
    rounding_offsets: list[int] | None = None,
) -> None:
    """One (uncentered) RMSprop step on 8-bit state; see :class:`fused_train.optim.RMSprop8bit`. The
    ``momentum_buffer`` lists are empty unless ``momentum > 0``; the rest as :func:`rmsprop_step_` and
    :func:`adam8bit_step_`."""
    _ops.rmsprop8bit_step_.default(
        params, grads, square_avg_codes, square_avg_absmax, momentum_buffer_codes, momentum_buffer_absmax,
        state_steps, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, maximize=maximize,
        zero_grad=zero_grad, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        rounding_seeds=rounding_seeds, rounding_offsets=rounding_offsets,
    )


# Fake kernels: the optimizer ops return nothing and change no shapes.
@torch.library.register_fake("fused_train::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, state_steps, **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::adam_step_")
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::adam8bit_step_")
def _adam8bit_step_fake(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                        state_steps, **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::rmsprop_step_")
def _rmsprop_step_fake(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::sgd8bit_step_")
def _sgd8bit_step_fake(params, grads, momentum_buffer_codes, momentum_buffer_absmax, state_steps, **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::rmsprop8bit_step_")
def _rmsprop8bit_step_fake(params, grads, square_avg_codes, square_avg_absmax, momentum_buffer_codes,
                           momentum_buffer_absmax, state_steps, **kwargs) -> None:
    return None


# -- cross-entropy ops (csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu) --


def cross_entropy_forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    *,
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    opmath_loss: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cross-entropy of 2-D ``input`` (rows, classes) in one read of the logits.

    ``target``: class indices (rows,) int64/int32, or probabilities of ``input``'s shape and dtype.
    ``reduction``: 0 none, 1 mean, 2 sum. Returns ``(loss, z_loss, row_lse, denominator)``: the loss (z-loss
    included) and the z-loss alone in ``input``'s dtype (in opmath with ``opmath_loss``, as torch's loss
    under autocast); each row's log-sum-exp as ``(max, log Σ exp(x - max))``
    pairs, shape (rows, 2), and the mean's denominator, both in opmath (fp64 for fp64 input, else fp32): what
    the backward needs. Two parts rather than one lse keep softmax = exp((x - max) - log_sum) exact for
    logits far from 0 (an fp32 lse near 1e4 is off by up to 5e-4).
    See :func:`fused_train.nn.functional.cross_entropy`.
    """
    return _ops.cross_entropy_forward.default(
        input, target, weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, opmath_loss=opmath_loss,
    )


def cross_entropy_backward(
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    row_lse: Tensor,
    denominator: Tensor,
    *,
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    inplace: bool = False,
) -> Tensor:
    """Gradient of :func:`cross_entropy_forward`'s loss with respect to ``input``, from its ``row_lse`` and
    ``denominator``: one read of the logits, one write of the gradient, ``grad_loss`` (any floating dtype)
    applied in opmath before the one rounding. With ``inplace`` the gradient is
    written over ``input`` (which is returned); only for logits that are not needed afterwards."""
    kwargs = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                  lse_square_scale=lse_square_scale)
    if inplace:
        _ops.cross_entropy_backward_.default(grad_loss, input, target, weight, row_lse, denominator, **kwargs)
        return input
    return _ops.cross_entropy_backward.default(grad_loss, input, target, weight, row_lse, denominator, **kwargs)


def cross_entropy_forward_backward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    *,
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    inplace: bool = False,
    opmath_loss: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`cross_entropy_forward` that also writes the gradient of the loss with respect to ``input`` for a
    loss gradient of 1 (of ones for ``reduction=0``), from the same pass: on CPU each row is read once from
    memory and once more from cache. Returns ``(loss, z_loss, row_lse, denominator, grad_input)``; with
    ``inplace`` the gradient is written over ``input``, which is returned as ``grad_input``. Apply the real
    loss gradient with :func:`cross_entropy_apply_grad_loss_` (or, in place, :func:`cross_entropy_scale_grad_`)."""
    if inplace:
        outputs = _ops.cross_entropy_forward_backward_.default(
            input, target, weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, opmath_loss=opmath_loss,
        )
        return (*outputs, input)
    return _ops.cross_entropy_forward_backward.default(
        input, target, weight, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, opmath_loss=opmath_loss,
    )


def cross_entropy_grad_loss_is_one(grad_loss: Tensor) -> bool:
    """Whether ``grad_loss`` is known, without a host synchronisation, to be all ones, so that
    :func:`cross_entropy_forward_backward`'s gradient is final: on CPU it is read; on CUDA the answer is
    always ``False`` (:func:`cross_entropy_apply_grad_loss_` then checks on the device)."""
    return _ops.cross_entropy_grad_loss_is_one.default(grad_loss)


def cross_entropy_apply_grad_loss_(
    grad_input: Tensor,
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    row_lse: Tensor,
    denominator: Tensor,
    *,
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
) -> None:
    """Makes :func:`cross_entropy_forward_backward`'s ``grad_input`` (written for a loss gradient of 1) the
    gradient for ``grad_loss``. Rows whose ``grad_loss`` is exactly 1 are left as they are (on CPU nothing at
    all is written for ``loss.backward()``; on CUDA ``grad_loss`` is never read on the host); the others are
    recomputed from ``input``, the scale applied in opmath before the one rounding (the bytes of a multiply:
    one read and one write of N×C). On CPU, where the recompute's exps cost ~3× a multiply, a power-of-two
    ``grad_loss`` (GradScaler's) multiplies bf16/fp32/fp64 gradients instead, which is exact for them.
    ``grad_input`` must not overlap ``input``."""
    _ops.cross_entropy_apply_grad_loss_.default(
        grad_input, grad_loss, input, target, weight, row_lse, denominator, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
    )


def cross_entropy_scale_grad_(grad_input: Tensor, grad_loss: Tensor) -> None:
    """``grad_input *= grad_loss`` (one element, or one per row of ``grad_input``), the product in opmath
    but rounded a second time: for a gradient written over the logits, which cannot be recomputed. On CPU
    nothing is written when ``grad_loss`` is all ones; on CUDA ``grad_loss`` is never read on the host."""
    _ops.cross_entropy_scale_grad_.default(grad_input, grad_loss)


def empty_cache() -> None:
    r"""Releases the memory fused_train keeps between calls for reuse, as :func:`torch.cuda.empty_cache` does
    for torch's CUDA caching allocator.

    What is kept: on CPU, :func:`fused_train.nn.functional.cross_entropy` keeps the memory of the last
    gradient of at least 1 MiB it wrote (an N×C buffer of the logits' dtype), so that the next step of the same
    size writes into memory that is already paged in instead of page-faulting a fresh buffer (for 4096×32000
    fp32 logits that costs more than the whole loss). The bound: at most one such buffer at any time, of the
    size of the most recent large gradient. A loss of another size replaces it; so does one that finds it
    still in use (a ``.grad`` not yet cleared: such a gradient is never written). Nothing else is kept: the
    CUDA loss allocates through torch's caching allocator (see :func:`torch.cuda.empty_cache`).

    Call it when training is done, or before a phase that needs the memory: the buffer goes back to the OS
    as soon as no gradient refers to it any more. The next large loss pays the page faults once again.

    Example::

        >>> for logits, target in batches:
        ...     fused_train.nn.functional.cross_entropy(logits, target).backward()
        >>> fused_train.empty_cache()
    """
    _ops.empty_cache.default()


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fused_train::cross_entropy_forward")
def _cross_entropy_forward_fake(input, target, weight, *, reduction, ignore_index, label_smoothing,
                                lse_square_scale, opmath_loss=False):
    rows = input.shape[0] * input.shape[2] if input.dim() == 3 else input.shape[0]  # (batch, classes, positions)
    loss_shape = (rows,) if reduction == 0 else ()
    opmath = _opmath(input.dtype)
    loss_dtype = opmath if opmath_loss else input.dtype
    return (
        input.new_empty(loss_shape, dtype=loss_dtype),
        input.new_empty(loss_shape, dtype=loss_dtype),
        input.new_empty((rows, 2), dtype=opmath),
        input.new_empty((), dtype=opmath),
    )


@torch.library.register_fake("fused_train::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, input, target, weight, row_lse, denominator, **kwargs):
    return input.new_empty(input.shape)


@torch.library.register_fake("fused_train::cross_entropy_backward_")
def _cross_entropy_backward_inplace_fake(grad_loss, input, target, weight, row_lse, denominator,
                                         **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::cross_entropy_forward_backward")
def _cross_entropy_forward_backward_fake(input, target, weight, **kwargs):
    return (*_cross_entropy_forward_fake(input, target, weight, **kwargs), input.new_empty(input.shape))


@torch.library.register_fake("fused_train::cross_entropy_forward_backward_")
def _cross_entropy_forward_backward_inplace_fake(input, target, weight, **kwargs):
    return _cross_entropy_forward_fake(input, target, weight, **kwargs)


@torch.library.register_fake("fused_train::cross_entropy_grad_loss_is_one")
def _cross_entropy_grad_loss_is_one_fake(grad_loss) -> bool:
    return False  # unknown while tracing: the traced backward always applies grad_loss (which checks again)


@torch.library.register_fake("fused_train::cross_entropy_apply_grad_loss_")
def _cross_entropy_apply_grad_loss_fake(grad_input, grad_loss, input, target, weight, row_lse, denominator,
                                        **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::cross_entropy_scale_grad_")
def _cross_entropy_scale_grad_fake(grad_input, grad_loss) -> None:
    return None


# -- linear + cross-entropy (csrc/linear_cross_entropy.cpp, any device) --


def linear_cross_entropy_forward(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    *,
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float,
    chunk_rows: int,
    input_grad: bool,
    linear_weight_grad: bool,
    linear_bias_grad: bool,
    opmath_loss: bool = False,
    opmath_weight_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` (capped at ``softcap·tanh(·/softcap)`` when
    ``softcap > 0``) against ``target``, over chunks of ``chunk_rows`` rows (0: sized automatically), never
    holding the (N, V) logits. ``input`` (N, H); ``target`` (N,) class indices or (N, V) probabilities.

    Returns ``(loss, row_lse, denominator, grad_input, grad_linear_weight, grad_linear_bias)``: the loss as
    :func:`cross_entropy_forward`'s, what :func:`linear_cross_entropy_backward` needs, and, for a reduced loss,
    the gradients asked for (``*_grad``) for a loss gradient of 1; the others are empty tensors.
    ``opmath_weight_grad``: with half-precision GEMMs, ``linear_weight``'s gradient is summed across chunks in fp32
    and rounded once (each chunk's part rounded once on its own), not in its dtype once per chunk."""
    return _ops.linear_cross_entropy_forward.default(
        input, linear_weight, target, linear_bias, weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
        chunk_rows=chunk_rows, input_grad=input_grad, linear_weight_grad=linear_weight_grad,
        linear_bias_grad=linear_bias_grad, opmath_loss=opmath_loss, opmath_weight_grad=opmath_weight_grad,
    )


def linear_cross_entropy_backward(
    grad_loss: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    row_lse: Tensor,
    denominator: Tensor,
    *,
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float,
    chunk_rows: int,
    input_grad: bool,
    linear_weight_grad: bool,
    linear_bias_grad: bool,
    opmath_weight_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`linear_cross_entropy_forward`'s loss for ``grad_loss`` (one element, or (N,) for
    ``reduction=0``), recomputed chunk by chunk from its ``row_lse`` and ``denominator``: ``(grad_input,
    grad_linear_weight, grad_linear_bias)``, empty where not asked for; ``opmath_weight_grad`` as the forward's."""
    return _ops.linear_cross_entropy_backward.default(
        grad_loss, input, linear_weight, target, linear_bias, weight, row_lse, denominator, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        softcap=softcap, chunk_rows=chunk_rows, input_grad=input_grad, linear_weight_grad=linear_weight_grad,
        linear_bias_grad=linear_bias_grad, opmath_weight_grad=opmath_weight_grad,
    )


def _linear_cross_entropy_grads_fake(input, linear_weight, linear_bias, input_grad, linear_weight_grad,
                                     linear_bias_grad):
    def grad(tensor, wanted):
        return input.new_empty(tensor.shape if wanted and tensor is not None else (0,))

    return (grad(input, input_grad), grad(linear_weight, linear_weight_grad), grad(linear_bias, linear_bias_grad))


@torch.library.register_fake("fused_train::linear_cross_entropy_forward")
def _linear_cross_entropy_forward_fake(input, linear_weight, target, linear_bias, weight, *, reduction,
                                       input_grad, linear_weight_grad, linear_bias_grad, opmath_loss=False,
                                       **kwargs):
    rows = input.shape[0]
    opmath = _opmath(input.dtype)
    reduced = reduction != 0
    return (
        input.new_empty((rows,) if not reduced else (), dtype=opmath if opmath_loss else input.dtype),
        input.new_empty((rows, 2), dtype=opmath),
        input.new_empty((), dtype=opmath),
        *_linear_cross_entropy_grads_fake(input, linear_weight, linear_bias, input_grad and reduced,
                                          linear_weight_grad and reduced, linear_bias_grad and reduced),
    )


@torch.library.register_fake("fused_train::linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(grad_loss, input, linear_weight, target, linear_bias, weight, row_lse,
                                        denominator, *, input_grad, linear_weight_grad, linear_bias_grad, **kwargs):
    return _linear_cross_entropy_grads_fake(input, linear_weight, linear_bias, input_grad, linear_weight_grad,
                                            linear_bias_grad)


# vmap rules for the two functional cross-entropy ops, which is what torch.vmap (and with it per-sample
# gradients, jacrev) meets under fused_train.nn.functional.cross_entropy: the vmapped dimension is folded
# into the rows, so a batch of B losses is one call over B·rows rows, reduced per sample afterwards (a batch
# of class weights: one call per sample).
def _batch_first(t: Tensor, dim: int | None, batch_size: int) -> Tensor:
    return t.expand(batch_size, *t.shape) if dim is None else t.movedim(dim, 0)


def _fold_samples(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, int]:
    """B samples' logits and targets, batch first, as one call's: (B, rows, C) folded into rows, (B, N, C, S)
    (the ops' (batch, classes, positions) layout) into batch entries; and each sample's number of rows."""
    if x.dim() == 3:
        batch, rows, classes = x.shape
        return x.reshape(batch * rows, classes), t.reshape(batch * rows, *t.shape[2:]), rows
    batch, n, classes, positions = x.shape
    return x.reshape(batch * n, classes, positions), t.reshape(batch * n, *t.shape[2:]), n * positions


def _vmap_per_sample(op, info, in_dims, args, kwargs):
    """The op once per sample, its results gathered into batched outputs: the vmap rule for what cannot fold
    into rows (a batched linear_weight, linear_bias or class weight, or per-sample parameter gradients)."""
    def sample_of(arg, dim, index):
        return arg if dim is None or arg is None else arg.select(dim, index)

    def call(*sample):
        out = op(*sample, **kwargs)
        return (out,) if isinstance(out, Tensor) else out

    if info.batch_size == 0:  # no sample to run: each output's shape from the op's fake kernel
        device = next(a.device for a in args if isinstance(a, Tensor))
        meta = [None if a is None else a.to("meta") for a in args]
        sample = [None if a is None else (a if d is None else a.new_empty(a.shape[:d] + a.shape[d + 1:]))
                  for a, d in zip(meta, in_dims)]
        outs = tuple(torch.empty((0, *o.shape), dtype=o.dtype, device=device) for o in call(*sample))
    else:
        # Each sample's results written into the batched outputs as they come (per-sample gradients of a
        # weight are as large as the outputs: stacking at the end would hold them twice).
        outs = None
        for b in range(info.batch_size):
            results = call(*(sample_of(a, d, b) for a, d in zip(args, in_dims)))
            if outs is None:
                outs = tuple(r.new_empty((info.batch_size, *r.shape)) for r in results)
            for out, r in zip(outs, results):
                out[b].copy_(r)
            del results
    if len(op._schema.returns) == 1:  # an op returning one Tensor, not a tuple
        return outs[0], 0
    return outs, (0,) * len(outs)


def _mean_denominators(target: Tensor, weight: Tensor | None, ignore_index: int, classes: int,
                       opmath: torch.dtype, rows: int | None = None) -> Tensor:
    """Each sample's mean divisor for targets (batch, rows[, classes]), as the ops compute it for one: its
    rows for probabilities, else Σ weight[target] over its rows that are not ignored (0 when all are). In
    int64: an int32 target compared with an ignore_index beyond int32 would wrap it. rows: a sample's rows
    where target is not laid out as (batch, rows[, classes])."""
    if target.is_floating_point():
        rows = target.shape[1] if rows is None else rows
        return torch.full((target.shape[0],), rows, dtype=opmath, device=target.device)
    kept = target.long().flatten(1) != ignore_index  # (batch, rows): a (batch, N, positions) target flattened
    if weight is None:
        return kept.sum(1).to(opmath)
    index = target.long().reshape(kept.shape).clamp(0, classes - 1)
    return torch.where(kept, weight.to(opmath)[index], 0).sum(1)


def _mean(total: Tensor, denominator: Tensor) -> Tensor:
    """A sample's mean as the ops take it: NaN over a denominator of 0, as torch's (its NLL part is 0/0
    there), also where label smoothing or the z-loss would make it ±inf."""
    return torch.where(denominator != 0, total / denominator, float("nan"))


def _cross_entropy_forward_vmap(info, in_dims, input, target, weight, *, reduction, ignore_index,
                                label_smoothing, lse_square_scale, opmath_loss=False):
    if in_dims[2] is not None:  # a class weight per sample
        return _vmap_per_sample(
            _ops.cross_entropy_forward.default, info, in_dims, (input, target, weight),
            dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                 lse_square_scale=lse_square_scale, opmath_loss=opmath_loss),
        )
    x = _batch_first(input, in_dims[0], info.batch_size)
    t = _batch_first(target, in_dims[1], info.batch_size)
    batch, classes = x.shape[0], x.shape[-2 if x.dim() == 4 else -1]
    folded_x, folded_t, rows = _fold_samples(x, t)
    loss, z_loss, row_lse, _ = _ops.cross_entropy_forward.default(
        folded_x, folded_t, weight, reduction=0, ignore_index=ignore_index, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, opmath_loss=True,
    )
    opmath = row_lse.dtype
    loss_dtype = opmath if opmath_loss else input.dtype
    row_lse = row_lse.reshape(batch, rows, 2)
    loss, z_loss = loss.reshape(batch, rows), z_loss.reshape(batch, rows)
    one = row_lse.new_ones(())
    if reduction == 0:
        return (loss.to(loss_dtype), z_loss.to(loss_dtype), row_lse, one), (0, 0, 0, None)
    if reduction == 2:
        return (loss.sum(1).to(loss_dtype), z_loss.sum(1).to(loss_dtype), row_lse, one), (0, 0, 0, None)
    # torch's weighted mean.
    denominator = _mean_denominators(t, weight, ignore_index, classes, opmath, rows)
    loss = _mean(loss.sum(1), denominator).to(loss_dtype)
    z_loss = _mean(z_loss.sum(1), denominator).to(loss_dtype)
    return (loss, z_loss, row_lse, denominator), (0, 0, 0, 0)


def _cross_entropy_backward_vmap(info, in_dims, grad_loss, input, target, weight, row_lse, denominator, *,
                                 reduction, ignore_index, label_smoothing, lse_square_scale):
    if in_dims[3] is not None:
        return _vmap_per_sample(
            _ops.cross_entropy_backward.default, info, in_dims,
            (grad_loss, input, target, weight, row_lse, denominator),
            dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                 lse_square_scale=lse_square_scale),
        )
    size = info.batch_size
    x = _batch_first(input, in_dims[1], size)
    t = _batch_first(target, in_dims[2], size)
    lse = _batch_first(row_lse, in_dims[4], size)
    batch = x.shape[0]
    folded_x, folded_t, rows = _fold_samples(x, t)
    g = _batch_first(grad_loss, in_dims[0], size).to(lse.dtype)
    if reduction == 0:
        g = g.reshape(batch, rows)
    else:
        # Each sample's grad_loss / denominator, in opmath, as the kernel applies it to every row (NaN for a
        # denominator of 0, as the kernel's rows that are not ignored get; the ignored ones stay 0).
        den = _batch_first(denominator, in_dims[5], size).reshape(batch).to(lse.dtype)
        g = _mean(g.reshape(batch), den)[:, None].expand(batch, rows)
    grad = _ops.cross_entropy_backward.default(
        g.reshape(batch * rows), folded_x, folded_t, weight, lse.reshape(batch * rows, 2), lse.new_ones(()),
        reduction=0, ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
    )
    return grad.reshape(x.shape), 0


torch.library.register_vmap("fused_train::cross_entropy_forward", _cross_entropy_forward_vmap)
torch.library.register_vmap("fused_train::cross_entropy_backward", _cross_entropy_backward_vmap)


def _linear_cross_entropy_forward_vmap(info, in_dims, input, linear_weight, target, linear_bias, weight, *,
                                       reduction, ignore_index, label_smoothing, lse_square_scale, softcap,
                                       chunk_rows, input_grad, linear_weight_grad, linear_bias_grad,
                                       opmath_loss=False, opmath_weight_grad=False):
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                   softcap=softcap, chunk_rows=chunk_rows, opmath_weight_grad=opmath_weight_grad)
    op = _ops.linear_cross_entropy_forward.default
    grads = dict(input_grad=input_grad, linear_weight_grad=linear_weight_grad, linear_bias_grad=linear_bias_grad)
    if any(d is not None for d in in_dims[1:2] + in_dims[3:]) or any(grads.values()):
        return _vmap_per_sample(op, info, in_dims, (input, linear_weight, target, linear_bias, weight),
                                dict(reduction=reduction, opmath_loss=opmath_loss, **options, **grads))
    # One weight for every sample (per-sample losses, the forward of per-sample gradients): the samples'
    # rows folded into one call, each sample's loss reduced afterwards.
    x = _batch_first(input, in_dims[0], info.batch_size)
    t = _batch_first(target, in_dims[2], info.batch_size)
    batch, rows = x.shape[:2]
    loss, row_lse, one, *empty = op(
        x.reshape(batch * rows, x.shape[-1]), linear_weight, t.reshape(batch * rows, *t.shape[2:]), linear_bias,
        weight, reduction=0, opmath_loss=True, **options, **grads,
    )
    loss_dtype = row_lse.dtype if opmath_loss else input.dtype
    loss, row_lse = loss.reshape(batch, rows), row_lse.reshape(batch, rows, 2)
    unbatched = (None,) * len(empty)
    if reduction == 0:
        return (loss.to(loss_dtype), row_lse, one, *empty), (0, 0, None, *unbatched)
    if reduction == 2:
        return (loss.sum(1).to(loss_dtype), row_lse, one, *empty), (0, 0, None, *unbatched)
    denominator = _mean_denominators(t, weight, ignore_index, linear_weight.shape[0], row_lse.dtype)
    return (_mean(loss.sum(1), denominator).to(loss_dtype), row_lse, denominator, *empty), (0, 0, 0, *unbatched)


def _linear_cross_entropy_backward_vmap(info, in_dims, grad_loss, input, linear_weight, target, linear_bias,
                                        weight, row_lse, denominator, *, reduction, ignore_index, label_smoothing,
                                        lse_square_scale, softcap, chunk_rows, input_grad, linear_weight_grad,
                                        linear_bias_grad, opmath_weight_grad=False):
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                   softcap=softcap, chunk_rows=chunk_rows, input_grad=input_grad,
                   opmath_weight_grad=opmath_weight_grad)
    op = _ops.linear_cross_entropy_backward.default
    if (any(d is not None for d in (in_dims[2], in_dims[4], in_dims[5])) or linear_weight_grad
            or linear_bias_grad):
        # A gradient of linear_weight or linear_bias per sample: one call per sample.
        return _vmap_per_sample(
            op, info, in_dims, (grad_loss, input, linear_weight, target, linear_bias, weight, row_lse, denominator),
            dict(reduction=reduction, linear_weight_grad=linear_weight_grad, linear_bias_grad=linear_bias_grad,
                 **options),
        )
    # Only input's gradient, which is per row: the samples folded into the rows as in the forward, each row's
    # loss gradient being its sample's grad_loss / denominator (NaN where the denominator is 0: the rows that
    # are not ignored get NaN, as torch's; the ignored ones stay 0).
    size = info.batch_size
    x = _batch_first(input, in_dims[1], size)
    t = _batch_first(target, in_dims[3], size)
    lse = _batch_first(row_lse, in_dims[6], size)
    batch, rows = x.shape[:2]
    g = _batch_first(grad_loss, in_dims[0], size).to(lse.dtype)
    if reduction == 0:
        g = g.reshape(batch, rows)
    else:
        den = _batch_first(denominator, in_dims[7], size).reshape(batch).to(lse.dtype)
        g = _mean(g.reshape(batch), den)[:, None].expand(batch, rows)
    grad_input, *empty = op(
        g.reshape(batch * rows), x.reshape(batch * rows, x.shape[-1]), linear_weight,
        t.reshape(batch * rows, *t.shape[2:]), linear_bias, weight, lse.reshape(batch * rows, 2), lse.new_ones(()),
        reduction=0, linear_weight_grad=False, linear_bias_grad=False, **options,
    )
    if input_grad:
        return (grad_input.reshape(x.shape), *empty), (0, None, None)
    return (grad_input, *empty), (None, None, None)


torch.library.register_vmap("fused_train::linear_cross_entropy_forward", _linear_cross_entropy_forward_vmap)
torch.library.register_vmap("fused_train::linear_cross_entropy_backward", _linear_cross_entropy_backward_vmap)


# fused_train::cross_entropy_loss (csrc/cross_entropy_autograd.cpp) is the loss with its autograd node in C++;
# nn/functional.py calls its OpOverload directly (a wrapper here would add a Python call to the path it exists
# to shorten).
@torch.library.register_fake("fused_train::cross_entropy_loss")
def _cross_entropy_loss_fake(input, target, weight, *, reduction, ignore_index, label_smoothing, lse_square_scale,
                             opmath_loss=False):
    dtype = _opmath(input.dtype) if opmath_loss else input.dtype
    return input.new_empty((input.shape[0],) if reduction == 0 else (), dtype=dtype)
