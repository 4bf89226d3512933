"""Shared test settings: the devices to run on, one tolerance table per dtype, and a runner for code that needs
the CPU kernels lowered to another instruction set."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import fused_train  # noqa: F401  (registers the ops)
from fused_train._build_info import _cpu_bf16_gemms_native

# (major, minor) of the torch under test, for the few tests of features newer than the oldest torch supported.
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

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
# the kernels and torch differ only in FMA contraction (torch's vectorized CPU ops fuse a*b+c, compilers
# contract differently), a few ulps per op; over a dozen steps on values of magnitude ~5 that reaches
# ~10 ulps of 5 in absolute terms where a running average cancels to near zero, hence atol = 1e-5 (fp32)
# beside rtol = 1e-5. bf16/fp16: one rounding of the stored value (2^-8 and 2^-11 relative) plus slack.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]




@contextlib.contextmanager
def cpu_half_gemms(road: str):
    """Within the block, linear_cross_entropy's CPU half-precision GEMMs take ``road``: 'auto' (native bf16 where
    the CPU has it) or 'fp32' (fp32 GEMMs over tiles), through FUSED_TRAIN_CPU_HALF_GEMMS (read per call)."""
    old = os.environ.get("FUSED_TRAIN_CPU_HALF_GEMMS")
    os.environ["FUSED_TRAIN_CPU_HALF_GEMMS"] = road
    try:
        yield
    finally:
        if old is None:
            del os.environ["FUSED_TRAIN_CPU_HALF_GEMMS"]
        else:
            os.environ["FUSED_TRAIN_CPU_HALF_GEMMS"] = old


# linear_cross_entropy's CPU bf16 GEMMs run in bf16 (oneDNN) where the CPU has bf16 dot products and oneDNN is on;
# elsewhere (and with FUSED_TRAIN_CPU_HALF_GEMMS=fp32) in fp32 over tiles. Whatever the variable says outside:
with cpu_half_gemms("auto"):
    NATIVE_CPU_BF16_GEMMS = _cpu_bf16_gemms_native()


def run_on_cpu_capability(code: str, capability: str) -> str:
    """Runs ``code`` (which may import the test modules) in a Python process of its own with the CPU kernels
    lowered to ``capability`` (FUSED_TRAIN_CPU_CAPABILITY: default, avx2 or avx512, read when fused_train
    loads, never raising the set above what the CPU has); asserts it succeeded and returns the instruction set
    fused_train reported there."""
    code += "\nimport fused_train\nprint(fused_train.build_info()['cpu_capability'])\n"
    env = dict(os.environ, FUSED_TRAIN_CPU_CAPABILITY=capability)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def assert_same_bits_for_any_thread_count(fn, counts=(1, 2, 3)) -> None:
    """Runs fn() (returning a tensor or a tuple of tensors) with each intra-op thread count in turn, the count
    restored after, and asserts every run returned the first run's tensors bit for bit."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            out = fn()
            results.append(out if isinstance(out, tuple) else (out,))
    finally:
        torch.set_num_threads(threads)
    for n, result in zip(counts[1:], results[1:]):
        assert all(torch.equal(a, b) for a, b in zip(result, results[0])), f"{n} threads differ from {counts[0]}"


def skip_unless_ran_on(capability: str, ran_on: str) -> None:
    """After run_on_cpu_capability: asserts the kernels were not raised above the set asked for, and skips the
    test where this CPU lacks it (fused_train then ran a lower one)."""
    order = ["default", "avx2", "avx512"]
    assert order.index(ran_on) <= order.index(capability), f"asked for {capability}, ran on {ran_on}"
    if ran_on != capability:
        pytest.skip(f"this CPU has no {capability} kernels (ran on {ran_on})")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # Torch before 2.6 links inductor's CPU kernels with -ffast-math, and loading the first one turns on
    # flush-to-zero for the whole process: every test starts again from IEEE subnormals (hypothesis refuses
    # to draw floats otherwise).
    torch.set_flush_denormal(False)
    yield


def assert_close_scaled(actual, expected, dtype=None):
    """assert_close with TOL[dtype], where atol also grows with the tensor's largest magnitude: a value
    that a running average cancelled to near zero carries the absolute rounding error of the large terms
    it was computed from, not an error relative to itself."""
    tol = dict(TOL[dtype or expected.dtype])
    if expected.numel() > 0:
        scale = expected.detach().float().abs().nan_to_num(0.0, 0.0, 0.0).max().item()
        tol["atol"] = max(tol["atol"], tol["rtol"] * scale)
    # NaN where the reference is NaN (e.g. centered RMSprop with alpha=0: sqrt of a rounding-negative
    # variance) is parity, not a failure.
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


def warm_up_and_capture(step, warmup, static_x, static_y):
    """torch.cuda.graph's recipe for a training step: ``step()`` run on a side stream for each (x, y) of
    ``warmup`` copied into the static inputs (creating optimizer state and grads), then recorded once.
    Returns the graph; nothing recorded has run."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in warmup:
            static_x.copy_(x)
            static_y.copy_(y)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
