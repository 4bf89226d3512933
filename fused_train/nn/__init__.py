"""Fused drop-ins for torch.nn losses."""

from . import functional
from .modules import CrossEntropyLoss

__all__ = ["CrossEntropyLoss", "functional"]
