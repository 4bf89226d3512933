"""Optimizer step benchmarks: fused_train beside torch.optim's for-loop, foreach and fused variants (and
DeepSpeed's CPU Adam where installed), in one run.

Each timed unit of the main table is what a training loop pays per step: ``step()`` followed by
``zero_grad(set_to_none=False)`` (gradients kept allocated). fused_train runs with ``zero_grad_in_step=True``,
so its zero_grad finds the gradients already zeroed by the kernel. Effective bandwidth (``gbs``) counts the
bytes each step must move: every stream read once and written once, e.g. fp32 Adam reads param, grad,
exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq (28 B/param), +4 B for writing the zeroed grad.

Its ceiling (``ceiling_gbs``, and ``pct_ceiling`` = gbs as a share of it) is measured in the same run, case
by case, by a compiled streaming pass with the optimizer's own access pattern over tensors of the same shapes
and dtypes, with the same threads (streaming_ceiling.cpp, built at first use). The implementations and the
ceiling pass of a case are timed in turns, each on its own tensors (``interleaved_ms``): a slow spell of a
shared machine falls on all of them, and each finds the others' data in the cache rather than its own.
``working_set_mib`` is what one of them touches per step: 16 x 1M fp32 Adam 256 MiB, far past a 32 MiB L3;
2000 x 1k 31 MiB, which could fit, but the turns (four or five such working sets between two steps of one
implementation) evict most of it, for the kernels and the ceiling alike. ``pct_copy_bw`` sets gbs against
the plain in-place scale of ``fused_train.benchmarking.copy_bandwidth_gbs`` (one read and one write stream).

The "step alone" rows (``zero_grad`` False) time ``step()`` only, at 1 and 2 threads, fp32 and bf16 params
(fp32 state), beside torch fused and DeepSpeed's CPU Adam (``DeepSpeedCPUAdam``, JIT-built on first use;
skipped with a note when deepspeed is not installed).

    python benchmarks/bench_optimizers.py [--device cuda] [--quick]
    pytest benchmarks/bench_optimizers.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from pathlib import Path

import torch

import fused_train
from fused_train.benchmarking import copy_bandwidth_gbs, interleaved_ms, time_ms

# (label, number of tensors, elements per tensor)
SHAPES = [("16 x 1M", 16, 1 << 20), ("2000 x 1k", 2000, 1000)]
QUICK_SHAPES = [("4 x 256k", 4, 1 << 18), ("500 x 1k", 500, 1000)]

# (name, torch class, kwargs, state tensors per param, torch variants that exist on CPU)
OPTIMIZERS = [
    ("Adam", "Adam", dict(lr=1e-3), 2, ("forloop", "foreach", "fused")),
    ("AdamW", "AdamW", dict(lr=1e-3, weight_decay=1e-2), 2, ("forloop", "foreach", "fused")),
    ("SGD+momentum", "SGD", dict(lr=1e-2, momentum=0.9), 1, ("forloop", "foreach", "fused")),
    ("RMSprop", "RMSprop", dict(lr=1e-3), 1, ("forloop", "foreach")),
]
# bf16 params (fp32 state in fused_train, bf16 state in torch) for the optimizer most trained in bf16
BF16_OPTIMIZERS = [("Adam", "Adam", dict(lr=1e-3), 2, ("foreach", "fused"))]

CEILING_SOURCE = Path(__file__).resolve().with_name("streaming_ceiling.cpp")


def bytes_per_param(dtype: torch.dtype, n_states: int, zero_grad: bool,
                    state_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one step moves per param: the param read and written, the grad read (and written when zeroed),
    each state read and written."""
    size = torch.empty((), dtype=dtype).element_size()
    state_size = torch.empty((), dtype=state_dtype).element_size()
    return 3 * size + 2 * n_states * state_size + (size if zero_grad else 0)


@functools.cache
def load_streaming_pass():
    """``torch.ops.fused_train_bench.streaming_pass_`` from streaming_ceiling.cpp, compiled on first use
    (-O3 -march=native, OpenMP; torch caches the build), or None with the reason on stderr."""
    try:
        from torch.utils.cpp_extension import load

        load(name="fused_train_streaming_ceiling", sources=[str(CEILING_SOURCE)],
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        return torch.ops.fused_train_bench.streaming_pass_
    except Exception as exc:  # no compiler, no ninja: the bench goes on without a ceiling
        print(f"bench_optimizers: no streaming ceiling ({type(exc).__name__}: {exc}); "
              "ceiling columns left empty", file=sys.stderr)
        return None


def ceiling_pass(n_tensors: int, numel: int, dtype: torch.dtype, n_states: int, zero_grad: bool, device: str):
    """One streaming pass with this access pattern over fresh tensors of these shapes, as a function that
    returns its seconds (timed inside the extension), or None off the CPU or without a compiler."""
    streaming_pass = load_streaming_pass() if torch.device(device).type == "cpu" else None
    if streaming_pass is None:
        return None
    params = [staggered_ones(numel, dtype, 0) for _ in range(n_tensors)]
    grads = [staggered_ones(numel, dtype, 1) for _ in range(n_tensors)]
    states = [staggered_ones(numel, torch.float32, 2 + j) for j in range(n_states) for _ in range(n_tensors)]
    return lambda: streaming_pass(params, grads, states, zero_grad, 1)[0]


def staggered_ones(numel: int, dtype: torch.dtype, stream: int) -> torch.Tensor:
    """A tensor of ones whose address modulo 4 KiB differs by stream (576 B apart). Fresh large torch
    tensors all start at the same offset in a page; a loop that loads one stream where it just stored
    another at the same offset modulo 4 KiB stalls on the CPU's false store-to-load dependencies (4K
    aliasing), and the plain loop then runs at about half its rate (measured on the AMD EPYC of
    benchmarks/results). The ceiling is the rate of the layout without those stalls."""
    size = torch.empty((), dtype=dtype).element_size()
    base = torch.ones(numel + 4096 // size, dtype=dtype)
    offset = ((stream * 576 - base.data_ptr()) % 4096) // size
    return base[offset:offset + numel]


def deepspeed_adam_class():
    """DeepSpeed's CPU Adam class, or None when deepspeed is not installed (it is no dependency)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception:
        return None
    return DeepSpeedCPUAdam


def median_ms(fn, device: str, repeat: int) -> float:
    return time_ms(fn, device, warmup=3, repeat=repeat)


def make_params(n_tensors: int, numel: int, device: str,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    params = [torch.randn(numel, device=device).to(dtype).requires_grad_() for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def make_step(kind: str, torch_name: str, kwargs: dict, params: list[torch.Tensor], zero_grad: bool = True):
    if kind == "fused_train":
        opt = getattr(fused_train.optim, torch_name)(params, zero_grad_in_step=zero_grad, **kwargs)
    elif kind == "deepspeed":
        # Adam with L2 weight decay as torch.optim.Adam (adamw_mode=False), fp32 state as fused_train's.
        opt = deepspeed_adam_class()(params, adamw_mode=torch_name == "AdamW", fp32_optimizer_states=True,
                                     **kwargs)
    else:
        flags = {"forloop": dict(foreach=False), "foreach": dict(foreach=True),
                 "fused": dict(fused=True)}[kind]
        opt = getattr(torch.optim, torch_name)(params, **kwargs, **flags)
    return step_and_restore(opt, params, zero_grad)


def step_and_restore(opt: torch.optim.Optimizer, params: list[torch.Tensor], zero_grad: bool = True):
    """The timed unit, ``opt.step()`` (then ``zero_grad(set_to_none=False)``), and a function that puts each param's
    gradient back afterwards. A warm grad (the kernel may have zeroed it) keeps the arithmetic identical across
    iterations."""
    grads = [p.grad for p in params]

    def step():
        opt.step()
        if zero_grad:
            opt.zero_grad(set_to_none=False)

    def restore():
        for p, g in zip(params, grads):
            p.grad = g

    return step, restore


def working_set_mib(dtype: torch.dtype, n_states: int, total: int) -> float:
    size = torch.empty((), dtype=dtype).element_size()
    return (2 * size + 4 * n_states) * total / 2**20


def time_case(name: str, torch_name: str, kwargs: dict, n_states: int, kinds: tuple[str, ...], label: str,
              n_tensors: int, numel: int, dtype: torch.dtype, zero_grad: bool, device: str, repeat: int,
              threads: int | None = None) -> list[dict]:
    """Rows for one optimizer × shape × dtype (× threads): fused_train, then each of ``kinds``, timed in
    turns with the pattern's ceiling pass (:func:`fused_train.benchmarking.interleaved_ms`), each on its own
    tensors: a slow spell of the machine falls on all alike, and each starts with the others' data in the
    cache, not its own."""
    total = n_tensors * numel
    fns, restores = {}, []
    for kind in ("fused_train",) + tuple(kinds):
        params = make_params(n_tensors, numel, device, dtype)
        fns[kind], restore = make_step(kind, torch_name, kwargs, params, zero_grad)
        restores.append(restore)
    ceiling = ceiling_pass(n_tensors, numel, dtype, n_states, zero_grad, device)
    if ceiling is not None:
        fns["ceiling"] = ceiling
    timings = interleaved_ms(fns, device, warmup=3, repeat=repeat)
    for restore in restores:
        restore()
    ceiling_ms = timings.pop("ceiling", None)
    ceiling_gbs = None
    if ceiling_ms:
        ceiling_gbs = bytes_per_param(dtype, n_states, zero_grad) * total / (ceiling_ms * 1e-3) / 1e9
    torch_kinds = [k for k in kinds if k != "deepspeed"]
    fastest_torch = min(timings[k] for k in torch_kinds) if torch_kinds else None
    rows = []
    for kind, ms in timings.items():
        # torch keeps bf16 state for bf16 params: fewer bytes, counted as such, and not the ceiling's pattern
        state_dtype = dtype if kind in torch_kinds and dtype != torch.float32 else torch.float32
        gbs = bytes_per_param(dtype, n_states, zero_grad, state_dtype) * total / (ms * 1e-3) / 1e9
        same_pattern = state_dtype == torch.float32
        row = dict(
            optimizer=name, shape=label, dtype=str(dtype).replace("torch.", ""), zero_grad=zero_grad,
            impl=kind if kind in ("fused_train", "deepspeed") else f"torch {kind}",
            ms=ms, ratio_vs_this=timings["fused_train"] / ms,
            ratio_vs_fastest_torch=(timings["fused_train"] / fastest_torch
                                    if kind == "fused_train" and fastest_torch else None),
            gbs=gbs, pct_ceiling=100 * gbs / ceiling_gbs if ceiling_gbs and same_pattern else None,
            ceiling_gbs=ceiling_gbs, working_set_mib=working_set_mib(dtype, n_states, total), device=device,
        )
        if threads is not None:
            row["threads"] = threads
        rows.append(row)
    return rows


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Times every optimizer × shape × implementation; returns one row per (optimizer, shape, impl).

    Rows: optimizer, shape, dtype, zero_grad (whether the timed unit includes zero_grad), impl, ms,
    ratio_vs_this (fused_train ms / this impl's ms), ratio_vs_fastest_torch (on the fused_train row), gbs
    (effective), pct_ceiling (gbs as a % of ceiling_gbs: this access pattern's streaming pass, same shapes
    and threads, this run), working_set_mib, pct_copy_bw (gbs as a % of copy_gbs: an in-place scale).
    "Step alone" rows (zero_grad False, a ``threads`` column) follow for Adam beside torch fused and
    DeepSpeed.
    """
    repeat = 5 if quick else 15
    copy_gbs = copy_bandwidth_gbs(device)
    shapes = QUICK_SHAPES if quick else SHAPES
    rows = []
    on_cpu = torch.device(device).type == "cpu"
    for name, torch_name, kwargs, n_states, torch_kinds in OPTIMIZERS:
        # DeepSpeed's CPU Adam (AdamW with adamw_mode) beside them, its zero_grad torch's
        with_deepspeed = on_cpu and torch_name in ("Adam", "AdamW") and deepspeed_adam_class() is not None
        kinds = torch_kinds + (("deepspeed",) if with_deepspeed else ())
        for label, n_tensors, numel in shapes:
            rows += time_case(name, torch_name, kwargs, n_states, kinds, label, n_tensors, numel,
                              torch.float32, True, device, repeat)
    for name, torch_name, kwargs, n_states, torch_kinds in BF16_OPTIMIZERS:
        label, n_tensors, numel = shapes[0]
        rows += time_case(name, torch_name, kwargs, n_states, torch_kinds, label, n_tensors, numel,
                          torch.bfloat16, True, device, repeat)
    rows += run_step_alone(device, quick, repeat)
    for row in rows:
        row["pct_copy_bw"] = 100 * row["gbs"] / copy_gbs
        row["copy_gbs"] = copy_gbs
    return rows


def run_step_alone(device: str, quick: bool, repeat: int) -> list[dict]:
    """Adam's step alone (no zero_grad), 16 x 1M fp32 and bf16, at 1 and 2 threads: fused_train beside torch
    fused and DeepSpeed's CPU Adam (CPU only; DeepSpeed where installed)."""
    if torch.device(device).type != "cpu":
        return []
    kinds = ("fused",)
    if deepspeed_adam_class() is not None:
        kinds += ("deepspeed",)
    else:
        print("bench_optimizers: deepspeed not installed; Adam rows without DeepSpeedCPUAdam",
              file=sys.stderr)
    label, n_tensors, numel = (QUICK_SHAPES if quick else SHAPES)[0]
    rows = []
    saved = torch.get_num_threads()
    try:
        for threads in sorted({1, min(2, os.cpu_count() or 1)}):
            torch.set_num_threads(threads)
            for dtype in (torch.float32, torch.bfloat16):
                rows += time_case("Adam", "Adam", dict(lr=1e-3), 2, kinds, label, n_tensors, numel, dtype,
                                  False, device, repeat, threads=threads)
    finally:
        torch.set_num_threads(saved)
    return rows


def run_zeroing(device: str = "cpu", quick: bool = False) -> list[dict]:
    """The grad-zeroing trade-off measured on whole training steps (forward, loss, backward, step,
    zero_grad) of an MLP with ~16.8M params: torch's fused AdamW and fused_train's, each with
    zero_grad(set_to_none=True) and with set_to_none=False."""
    torch.manual_seed(0)
    width, depth, batch = (1024, 2, 32) if quick else (2048, 4, 32)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    base = torch.nn.Sequential(*layers).to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, width, (batch,), device=device)
    rows = []
    for impl in ("torch fused", "fused_train"):
        for set_to_none in (True, False):
            model = copy.deepcopy(base)
            if impl == "fused_train":
                opt = fused_train.optim.AdamW(model.parameters(), lr=1e-4)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def train_step():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=set_to_none)

            ms = median_ms(train_step, device, 5 if quick else 15)
            rows.append(dict(impl=impl, set_to_none=set_to_none, ms=ms, params=sum(p.numel() for p in base.parameters()),
                             device=device))
    return rows


def format_rows(rows: list[dict]) -> str:
    def cell(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = [f"{'optimizer':<13} {'shape':<10} {'dtype':<8} {'thr':>3} {'zero':<5} {'impl':<14} {'ms':>9} "
             f"{'fused/this':>10} {'GB/s':>7} {'%ceil':>6} {'ceil GB/s':>9} {'MiB':>6}"]
    for r in rows:
        lines.append(
            f"{r['optimizer']:<13} {r['shape']:<10} {r['dtype']:<8} "
            f"{cell(r.get('threads'), 'd'):>3} {r['zero_grad']!s:<5} {r['impl']:<14} {r['ms']:>9.3f} "
            f"{r['ratio_vs_this']:>9.2f}x {r['gbs']:>7.1f} {cell(r['pct_ceiling'], '.0f'):>5}% "
            f"{cell(r['ceiling_gbs'], '.1f'):>9} {r['working_set_mib']:>6.0f}"
        )
    if rows:
        lines.append(f"in-place scale (read+write) bandwidth measured in this run: "
                     f"{rows[0]['copy_gbs']:.1f} GB/s ({rows[0]['device']})")
    return "\n".join(lines)


# pytest-benchmark entry points: `pytest benchmarks/bench_optimizers.py --benchmark-enable`
def _bench(benchmark, kind, optimizer):
    name, torch_name, kwargs, _, torch_kinds = next(o for o in OPTIMIZERS if o[0] == optimizer)
    if kind != "fused_train" and kind not in torch_kinds:
        import pytest

        pytest.skip(f"torch has no {kind} {name} on this device")
    params = make_params(16, 1 << 20, "cpu")
    step, _ = make_step(kind, torch_name, kwargs, params)
    benchmark(step)


def test_adam_16x1M_fused_train(benchmark):
    _bench(benchmark, "fused_train", "Adam")


def test_adam_16x1M_torch_fused(benchmark):
    _bench(benchmark, "fused", "Adam")


def test_rmsprop_16x1M_fused_train(benchmark):
    _bench(benchmark, "fused_train", "RMSprop")


def test_rmsprop_16x1M_torch_foreach(benchmark):
    _bench(benchmark, "foreach", "RMSprop")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(format_rows(run(args.device, args.quick)))
    for row in run_zeroing(args.device, args.quick):
        print(f"train step, {row['impl']:<12} zero_grad(set_to_none={row['set_to_none']!s:<5}): {row['ms']:8.2f} ms")
