"""Forward + backward of fused_train's cross-entropy beside F.cross_entropy (and a torch.compile'd
F.cross_entropy where practical).

Two entry points: ``run(device, quick)`` returns one dict per case (the CLI's ``fused-train bench`` prints
them); the ``test_*`` functions are pytest-benchmark cases (``pytest benchmarks/bench_cross_entropy.py
--benchmark-enable``).

GB/s is measured against the one-pass limit: every logit read once and its gradient written once
(2 × N × V × itemsize bytes), whatever the implementation actually moves.

On CPU the large cases are dominated by paging in fresh N×V buffers (the gradient for fused_train; the
log-probabilities and the gradient for torch), which is why the in-place column is given too and why
``THP_MEM_ALLOC_ENABLE`` (torch's transparent-huge-page switch) is recorded with the results.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import fused_train
from fused_train.benchmarking import time_ms
from fused_train.nn.functional import cross_entropy as fused_cross_entropy

CASES = [
    (64, 10, torch.float32),
    (8192, 1000, torch.float32),
    (4096, 32000, torch.float32),
    (2048, 128256, torch.float32),
    (64, 10, torch.bfloat16),
    (8192, 1000, torch.bfloat16),
    (2048, 32000, torch.bfloat16),
    (2048, 128256, torch.bfloat16),
]
# On a GPU, the shapes issue 10 sets its targets at: LM vocabularies (32K, 128K), 1000 classes, and a
# segmentation loss over (batch, classes, height, width) = (8, 21, 512, 512) logits, plus the launch-bound 64×10.
# A case's first entry is the logits' shape when it is a tuple (N and V are then rows and classes).
CUDA_CASES = [
    (shape, dtype)
    for dtype in (torch.float32, torch.bfloat16)
    for shape in ((64, 10), (8192, 32000), (4096, 128256), (65536, 1000), (8, 21, 512, 512))
]
QUICK_CASES = [(64, 10, torch.float32), (8192, 1000, torch.float32), (512, 32000, torch.bfloat16)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fwd_bwd(loss_fn, logits, target):
    loss = loss_fn(logits, target)
    loss.backward()
    logits.grad = None


def _fwd_bwd_inplace(logits, target):
    """fused_train with ``inplace_backward=True``: the gradient is written over ``logits`` (which therefore
    hold the last gradient from the second call on: the timing does not depend on the values) and returned
    by autograd.grad, as the gradient of an lm_head's output flows on to its matmul."""
    loss = fused_cross_entropy(logits, target, inplace_backward=True)
    torch.autograd.grad(loss, logits)


def _time_ms(fn, device: str, min_reps: int, min_seconds: float) -> float:
    """Median time of fn() in ms (fused_train.benchmarking.time_ms: CUDA events on a GPU)."""
    return time_ms(fn, device, warmup=1, repeat=min_reps, min_seconds=min_seconds)


def _peak_mb(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _forward_only(loss_fn, logits, target):
    with torch.no_grad():
        loss_fn(logits, target)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Times forward + backward for each case; one row per (shape, dtype).

    Row keys: N (rows), V (classes), shape (the logits'), dtype, torch_ms, fused_ms, ratio (fused / torch),
    fused_inplace_ms and inplace_ratio (``inplace_backward=True``), fused_forward_ms and torch_forward_ms (the loss
    alone, without gradient), compiled_ms (torch.compile'd F.cross_entropy, None where skipped), fused_gbps
    (against the one-pass limit), limit_gb, and on CUDA torch_peak_mb / fused_peak_mb (memory beyond the logits
    during the call).
    """
    rows = []
    if quick:
        cases = QUICK_CASES
    elif device.startswith("cuda"):
        cases = CUDA_CASES
    else:
        cases = CASES
    # CUDA events time a GPU steadily in a fraction of a second; the device's minutes are few.
    min_reps, min_seconds = (3, 0.2) if quick else (5, 0.3 if device.startswith("cuda") else 1.0)
    compiled = None
    if not quick:
        try:
            compiled = torch.compile(F.cross_entropy)
        except Exception:  # noqa: BLE001 (no compiler toolchain: the column stays empty)
            compiled = None
    for case in cases:
        if isinstance(case[0], tuple):
            shape, dtype = case
        else:
            shape, dtype = (case[0], case[1]), case[2]
        classes = shape[1]
        n = shape[0] * (1 if len(shape) == 2 else int(torch.Size(shape[2:]).numel()))
        gen = torch.Generator(device="cpu").manual_seed(0)
        logits = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        target_shape = (shape[0],) + tuple(shape[2:])
        target = torch.randint(0, classes, target_shape, generator=gen).to(device)
        torch_fn = lambda: _fwd_bwd(F.cross_entropy, logits, target)  # noqa: E731
        fused_fn = lambda: _fwd_bwd(fused_cross_entropy, logits, target)  # noqa: E731
        torch_ms = _time_ms(torch_fn, device, min_reps, min_seconds)
        fused_ms = _time_ms(fused_fn, device, min_reps, min_seconds)
        fused_forward_ms = _time_ms(partial(_forward_only, fused_cross_entropy, logits, target), device, min_reps,
                                    min_seconds)
        torch_forward_ms = _time_ms(partial(_forward_only, F.cross_entropy, logits, target), device, min_reps,
                                    min_seconds)
        inplace_logits = logits.detach().clone().requires_grad_()
        inplace_ms = _time_ms(lambda: _fwd_bwd_inplace(inplace_logits, target), device, min_reps, min_seconds)
        del inplace_logits
        compiled_ms = None
        # On CPU only the smaller cases (compiling and running the large ones there takes minutes); on CUDA the
        # vocabularies of 32K and more, where issue 10 sets its target against torch.compile.
        wanted = classes >= 32000 if device.startswith("cuda") else n * classes <= 64 * 2**20
        if compiled is not None and wanted:
            try:
                compiled_ms = _time_ms(lambda: _fwd_bwd(compiled, logits, target), device, min_reps, min_seconds)
            except Exception:  # noqa: BLE001
                compiled_ms = None
        limit_bytes = 2 * n * classes * logits.element_size()
        rows.append(
            dict(
                device=device,
                N=n,
                V=classes,
                shape="x".join(map(str, shape)),
                dtype=str(dtype).replace("torch.", ""),
                torch_ms=round(torch_ms, 3),
                fused_ms=round(fused_ms, 3),
                ratio=round(fused_ms / torch_ms, 3),
                fused_inplace_ms=round(inplace_ms, 3),
                inplace_ratio=round(inplace_ms / torch_ms, 3),
                fused_forward_ms=round(fused_forward_ms, 3),
                torch_forward_ms=round(torch_forward_ms, 3),
                compiled_ms=None if compiled_ms is None else round(compiled_ms, 3),
                fused_gbps=round(limit_bytes / (fused_ms * 1e-3) / 1e9, 2),
                limit_gb=round(limit_bytes / 1e9, 3),
                torch_peak_mb=_peak_mb(torch_fn, device),
                fused_peak_mb=_peak_mb(fused_fn, device),
            )
        )
        del logits, target
    return rows


# -- pytest-benchmark cases --------------------------------------------------------------------------------

PYTEST_CASES = [(64, 10, torch.float32), (8192, 1000, torch.float32), (512, 32000, torch.float32),
                (512, 32000, torch.bfloat16)]


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("n, v, dtype", PYTEST_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_cross_entropy_fwd_bwd(benchmark, impl, n, v, dtype):
    logits = torch.randn(n, v, dtype=dtype, requires_grad=True)
    target = torch.randint(0, v, (n,))
    loss_fn = F.cross_entropy if impl == "torch" else fused_cross_entropy
    benchmark.group = f"cross_entropy {n}x{v} {dtype}"
    benchmark(_fwd_bwd, loss_fn, logits, target)


if __name__ == "__main__":
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(fused_train.build_info(), "THP_MEM_ALLOC_ENABLE=" + os.environ.get("THP_MEM_ALLOC_ENABLE", ""))
    for row in run(args.device, args.quick):
        print(json.dumps(row))
