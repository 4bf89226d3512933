"""Per-sample gradients, torch.func's ``vmap(grad(loss of one sample))``, of a language model's last layer and
loss, beside torch: fused_train's ``linear_cross_entropy`` against ``linear`` + ``F.cross_entropy``, each
under the same two transforms. B samples of N rows each, hidden size H, V classes, fp32.

- ``--grads input``: each sample's gradient of its hidden states. fused_train folds the B samples' rows into
  one call (its vmap rule), torch's batching rules run linear and the loss over the (B, N, V) logits.
- ``--grads all``: of the hidden states and of the head's weight and bias, so B copies of the weight's
  gradient come back. fused_train makes one call per sample; torch batches the whole.

    python benchmarks/bench_per_sample_gradients.py [--cases B,N,H,V ...] [--grads input all] [--reps 5]
        [--json FILE]

Time: both implementations warmed up, then ``--reps`` rounds (more where that takes under a second, up to
500) of one call each in turns; medians, and the median per-round ratio. Memory: each (case, grads,
implementation) in a process of its own, glibc mapping every block above 128 KiB (so resident memory
follows live tensors): the peak resident memory of one call above what was resident before it, less the
bytes of the gradients it returns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

IMPLS = ("fused", "torch")
DEFAULT_CASES = ("32,16,64,1000", "16,128,256,8000", "8,512,512,32000")


def make_call(impl: str, b: int, n: int, h: int, v: int, grads: str):
    """(call, returned_bytes): call() computes the per-sample gradients once."""
    import torch
    import torch.nn.functional as F

    import fused_train.nn.functional as fused

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, h, generator=gen) / h**0.5
    w = torch.randn(v, h, generator=gen) * 0.02
    bias = torch.zeros(v)
    target = torch.randint(0, v, (b, n), generator=gen)
    target[:, ::17] = -100

    if impl == "fused":
        def loss(x, w, bias, t):
            return fused.linear_cross_entropy(x, w, t, linear_bias=bias)
    else:
        def loss(x, w, bias, t):
            return F.cross_entropy(F.linear(x, w, bias), t)

    argnums = (0,) if grads == "input" else (0, 1, 2)
    per_sample = torch.vmap(torch.func.grad(loss, argnums=argnums), in_dims=(0, None, None, 0))
    returned = x.numel() + (0 if grads == "input" else b * (w.numel() + bias.numel()))
    return (lambda: per_sample(x, w, bias, target)), returned * x.element_size()


def measure_memory(impl: str, b: int, n: int, h: int, v: int, grads: str) -> dict:
    from fused_train.benchmarking import peak_memory, reset_peak_memory

    call, returned = make_call(impl, b, n, h, v, grads)
    call()  # a first call's one-time buffers (MKL's GEMM packing) stay, as in a training loop
    before = reset_peak_memory()
    start = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - start
    extra = peak_memory() - before - returned
    del out
    return dict(extra_peak_mib=round(extra / 2**20, 1), call_seconds=seconds)


def measure_times(b: int, n: int, h: int, v: int, grads: str, reps: int) -> dict:
    from fused_train.benchmarking import interleaved_samples

    calls = {impl: make_call(impl, b, n, h, v, grads)[0] for impl in IMPLS}
    slowest = 0.0
    for call in calls.values():  # warm-up, and how many rounds make a second: short calls are noisy
        start = time.perf_counter()
        call()
        slowest = max(slowest, time.perf_counter() - start)
    reps = max(reps, min(500, int(1.0 / slowest)))
    samples = interleaved_samples(calls, "cpu", warmup=1, repeat=reps)
    out = {}
    for impl, ms in samples.items():
        out[impl] = dict(seconds=statistics.median(ms) / 1e3, seconds_min=min(ms) / 1e3, reps=len(ms))
    out["torch"]["fused_over_this"] = statistics.median(f / t for f, t in zip(samples["fused"], samples["torch"]))
    return out


def _run_self(args: list[str], exact_resident_memory: bool = False) -> dict:
    from fused_train.benchmarking import run_json_in_subprocess

    return run_json_in_subprocess(__file__, args, exact_resident_memory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="B,N,H,V")
    parser.add_argument("--grads", nargs="+", default=["input", "all"], choices=["input", "all"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="append one JSON line per row")
    parser.add_argument("--memory", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--times", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        impl, *sizes, grads = args.memory
        print(json.dumps(measure_memory(impl, *map(int, sizes), grads)))
        return 0
    if args.times:
        *sizes, grads = args.times
        print(json.dumps(measure_times(*map(int, sizes), grads, args.reps)))
        return 0
    import torch

    for case in args.cases:
        sizes = case.split(",")
        b, n, h, v = map(int, sizes)
        for grads in args.grads:
            times = _run_self(["--times", *sizes, grads, "--reps", str(args.reps)])
            rows = {}
            for impl in IMPLS:
                memory = _run_self(["--memory", impl, *sizes, grads], exact_resident_memory=True)
                rows[impl] = dict(impl=impl, b=b, n=n, h=h, v=v, grads=grads, dtype="float32", device="cpu",
                                  torch=torch.__version__, threads=torch.get_num_threads(), **memory, **times[impl])
            if args.json:
                with open(args.json, "a") as f:
                    for row in rows.values():
                        f.write(json.dumps(row) + "\n")
            fused, peer = rows["fused"], rows["torch"]
            print(f"B={b} N={n} H={h} V={v} grads={grads}:  fused {1e3 * fused['seconds']:.1f} ms "
                  f"{fused['extra_peak_mib']:+.0f} MiB  torch {1e3 * peer['seconds']:.1f} ms "
                  f"{peer['extra_peak_mib']:+.0f} MiB  fused/torch {peer['fused_over_this']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
