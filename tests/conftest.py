"""Shared test settings: the devices to run on, and one tolerance table per dtype."""

import pytest
import torch

import fused_train  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and fused_train.build_info()["cuda_compiled"]
_NO_CUDA_REASON = (
    "no CUDA device here" if not torch.cuda.is_available() else "fused_train was built without CUDA kernels"
)

# Every device test runs on CPU, and on CUDA when a GPU is present (skipped with the reason otherwise).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=_NO_CUDA_REASON)),
]
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason=_NO_CUDA_REASON)

# Tolerances against a reference computed the same way (same opmath, same rounding points). fp32/fp64:
# a few ulps of the reassociation and FMA-contraction differences between kernels. bf16/fp16: one rounding
# of the stored value (2^-8 and 2^-11 relative) plus an ulp of slack.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
