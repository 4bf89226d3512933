"""What this installation of fused_train was built with and what it runs on."""

from __future__ import annotations

import os

import torch


def build_info() -> dict:
    """Facts about the compiled extension.

    Returns:
        dict with ``torch_version`` (built against), ``torch_runtime`` (imported now), ``cuda_compiled``
        (bool), ``cuda_archs`` (list of architectures the CUDA kernels were compiled for),
        ``cpu_capability`` (instruction set of the CPU kernels chosen at run time: ``avx512``, ``avx2`` or
        ``default``), ``cpu_bf16_dot_product`` (bool: the CPU has bf16 dot-product instructions, AVX512_BF16, so
        that oneDNN runs bf16 GEMMs natively and ``linear_cross_entropy`` runs its bf16 GEMMs in bf16 on CPU),
        ``num_threads`` (torch's intra-op threads) and ``cuda_available``.

    Example::

        >>> fused_train.build_info()["cpu_capability"]
        'avx512'
    """
    raw = dict(line.split("=", 1) for line in torch.ops.fused_train.build_info().splitlines() if "=" in line)
    archs = [a for a in raw.get("cuda_archs", "").replace(",", ";").split(";") if a]
    return {
        "torch_version": raw.get("torch_version", ""),
        "torch_runtime": torch.__version__,
        "cuda_compiled": raw.get("cuda_compiled") == "1",
        "cuda_archs": archs,
        "cpu_capability": raw.get("cpu_capability", "").lower(),
        "cpu_bf16_dot_product": raw.get("cpu_bf16_dot_product") == "1",
        "num_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }


def _cpu_bf16_gemms_native(info: dict | None = None) -> bool:
    """Whether ``linear_cross_entropy`` runs CPU bf16 GEMMs in bf16 now, as ``cpu_half_gemms_native`` in
    ``csrc/linear_cross_entropy.cpp`` decides on every call: bf16 dot products (``info``'s, else this
    machine's), oneDNN built in and enabled, and ``FUSED_TRAIN_CPU_HALF_GEMMS`` unset or ``auto``."""
    info = info if info is not None else build_info()
    return (bool(info.get("cpu_bf16_dot_product")) and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and os.environ.get("FUSED_TRAIN_CPU_HALF_GEMMS", "") in ("", "auto"))
