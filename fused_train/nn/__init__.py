"""Fused drop-ins for torch.nn losses."""

from . import functional

__all__ = ["functional"]
