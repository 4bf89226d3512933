"""Fused drop-ins for torch.nn losses."""

from . import functional
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "functional"]
