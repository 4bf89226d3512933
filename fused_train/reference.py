"""Plain-PyTorch references the tests compare the fused kernels against. Each topic keeps to its own
clearly named functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# -- cross-entropy ---------------------------------------------------------------------------------------


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
