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
) -> None:
    """One SGD step over same-device, same-dtype params; see :class:`fused_train.optim.SGD`.

    ``momentum_buffers`` is empty when ``momentum == 0``; with ``is_first_step`` the buffers are
    overwritten with the first gradient (torch's ``clone`` on first use). ``zero_grad`` writes zeros
    into each gradient after reading it. ``grad_scale``/``found_inf`` come from GradScaler: grads are
    divided by ``grad_scale`` and the whole step is skipped when ``found_inf`` is nonzero.
    """
    _ops.sgd_step_.default(
        params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, is_first_step=is_first_step,
        zero_grad=zero_grad, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
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
) -> None:
    """One Adam/AdamW step; see :class:`fused_train.optim.Adam`. Advances each ``state_steps`` entry by
    one inside the op. ``max_exp_avg_sqs`` is empty unless ``amsgrad``."""
    _ops.adam_step_.default(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
        beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay, zero_grad=zero_grad, lr_tensor=lr_tensor,
        grad_scale=grad_scale, found_inf=found_inf,
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
) -> None:
    """One RMSprop step; see :class:`fused_train.optim.RMSprop`. ``grad_avgs`` is empty unless
    ``centered``, ``momentum_buffers`` empty unless ``momentum > 0``."""
    _ops.rmsprop_step_.default(
        params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr=lr, alpha=alpha, eps=eps,
        weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
        zero_grad=zero_grad, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
    )


# Fake kernels: the optimizer ops return nothing and change no shapes.
@torch.library.register_fake("fused_train::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::adam_step_")
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs) -> None:
    return None


@torch.library.register_fake("fused_train::rmsprop_step_")
def _rmsprop_step_fake(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, **kwargs) -> None:
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cross-entropy of 2-D ``input`` (rows, classes) in one read of the logits.

    ``target``: class indices (rows,) int64/int32, or probabilities of ``input``'s shape and dtype.
    ``reduction``: 0 none, 1 mean, 2 sum. Returns ``(loss, z_loss, row_lse, denominator)``: the loss (z-loss
    included) and the z-loss alone in ``input``'s dtype; each row's log-sum-exp as ``(max, log Σ exp(x - max))``
    pairs, shape (rows, 2), and the mean's denominator, both in opmath (fp64 for fp64 input, else fp32): what
    the backward needs. Two parts rather than one lse keep softmax = exp((x - max) - log_sum) exact for
    logits far from 0 (an fp32 lse near 1e4 is off by up to 5e-4).
    See :func:`fused_train.nn.functional.cross_entropy`.
    """
    return _ops.cross_entropy_forward.default(
        input, target, weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
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
    ``denominator``: one read of the logits, one write of the gradient. With ``inplace`` the gradient is
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`cross_entropy_forward` that also writes the gradient of the loss with respect to ``input`` for a
    loss gradient of 1 (of ones for ``reduction=0``), from the same pass: on CPU each row is read once from
    memory and once more from cache. Returns ``(loss, z_loss, row_lse, denominator, grad_input)``; with
    ``inplace`` the gradient is written over ``input``, which is returned as ``grad_input``. Scale it by the
    real loss gradient with :func:`cross_entropy_scale_grad_`."""
    if inplace:
        outputs = _ops.cross_entropy_forward_backward_.default(
            input, target, weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        )
        return (*outputs, input)
    return _ops.cross_entropy_forward_backward.default(
        input, target, weight, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
    )


def cross_entropy_scale_grad_(grad_input: Tensor, grad_loss: Tensor) -> None:
    """``grad_input *= grad_loss`` (one element, or one per row of ``grad_input``). On CPU nothing is written
    when ``grad_loss`` is all ones; on CUDA ``grad_loss`` is never read on the host."""
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
                                lse_square_scale):
    rows = input.shape[0]
    loss_shape = (rows,) if reduction == 0 else ()
    opmath = _opmath(input.dtype)
    return (
        input.new_empty(loss_shape),
        input.new_empty(loss_shape),
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


@torch.library.register_fake("fused_train::cross_entropy_scale_grad_")
def _cross_entropy_scale_grad_fake(grad_input, grad_loss) -> None:
    return None


# fused_train::cross_entropy_loss (csrc/cross_entropy_autograd.cpp) is the loss with its autograd node in C++;
# nn/functional.py calls its OpOverload directly (a wrapper here would add a Python call to the path it exists
# to shorten).
@torch.library.register_fake("fused_train::cross_entropy_loss")
def _cross_entropy_loss_fake(input, target, weight, *, reduction, ignore_index, label_smoothing, lse_square_scale):
    return input.new_empty((input.shape[0],) if reduction == 0 else ())
