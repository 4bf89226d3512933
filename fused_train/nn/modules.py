"""Fused drop-in loss modules."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import functional as F

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    r"""Drop-in for :class:`torch.nn.CrossEntropyLoss` (a subclass of it: same constructor, ``weight`` kept
    as a buffer, same results) computed by :func:`fused_train.nn.functional.cross_entropy`.

    Args:
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: as
            :class:`torch.nn.CrossEntropyLoss`.
        lse_square_scale: z-loss scale (keyword-only, default 0: off).
        inplace_backward: write the gradient over the logits (keyword-only, default off); see
            :func:`fused_train.nn.functional.cross_entropy` for when that is safe.

    Shape:
        - Input: :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`.
        - Target: class indices :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)`, or probabilities of the
          input's shape.
        - Output: scalar, or the target's (batch) shape for ``reduction='none'``.

    Example::

        >>> loss_fn = fused_train.nn.CrossEntropyLoss(label_smoothing=0.1)
        >>> loss = loss_fn(torch.randn(4, 10, requires_grad=True), torch.tensor([1, 0, 9, 3]))
        >>> loss.backward()
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        lse_square_scale: float = 0.0,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.lse_square_scale = lse_square_scale
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F._cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            self.lse_square_scale, self.inplace_backward, False,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.lse_square_scale:
            parts.append(f"lse_square_scale={self.lse_square_scale}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        return ", ".join(parts)


class LinearCrossEntropyLoss(torch.nn.Module):
    r"""A language model's head and loss in one: ``linear`` (``self.linear``, an :class:`torch.nn.Linear` from
    ``in_features`` to ``num_classes``) then cross-entropy, computed by
    :func:`fused_train.nn.functional.linear_cross_entropy` without the (N, V) logits. Constructor as
    :class:`torch.nn.LinearCrossEntropyLoss` (torch >= 2.14; ``options`` read as
    :func:`~fused_train.nn.functional.linear_cross_entropy` reads it; ``out_features``: a K-dimensional loss whose
    ``self.linear`` holds ``num_classes · prod(out_features)`` rows, as torch's), plus ``lse_square_scale``,
    ``softcap`` and ``chunk_size``; its ``state_dict`` loads into torch's and back. To tie the head to an input
    embedding, assign ``loss_fn.linear.weight = embedding.weight``.

    Shape:
        - Input: :math:`(*, H)`; target: class indices :math:`(*)` or probabilities :math:`(*, V)`.
        - Output: scalar, or the target's (batch) shape for ``reduction='none'``.

    Example::

        >>> loss_fn = fused_train.nn.LinearCrossEntropyLoss(64, 1000, ignore_index=-100)
        >>> hidden = torch.randn(2, 16, 64, requires_grad=True)
        >>> loss_fn(hidden, torch.randint(0, 1000, (2, 16))).backward()
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        options: "torch.nn.LinearCrossEntropyOptions | None" = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        # Each position of out_features a (num_classes, in_features) head, stored as one Linear, as torch's.
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.options = options

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        if self.out_features:  # the K-dimensional loss's heads: (num_classes, *out_features, in_features)
            heads = (self.num_classes, *self.out_features)
            weight, bias = weight.reshape(*heads, weight.shape[-1]), None if bias is None else bias.reshape(heads)
        return F.linear_cross_entropy(
            input, weight, target, linear_bias=bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale, softcap=self.softcap, chunk_size=self.chunk_size,
            options=self.options,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        if self.out_features:
            parts.append(f"out_features={self.out_features}")
        for name in ("label_smoothing", "lse_square_scale", "softcap", "chunk_size", "options"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)}")
        return ", ".join(parts)
