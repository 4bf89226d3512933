"""The language model's last layer and loss, forward + backward, beside its peers: fused_train's
``linear_cross_entropy``, ``linear`` + ``F.cross_entropy`` (torch), torch's chunked ``F.linear_cross_entropy``
(torch >= 2.14, ``options=LinearCrossEntropyOptions()``), and the floor: the same three GEMMs alone
(logits, input gradient, weight gradient) over preallocated tensors (on CPU in fp32 for fp16, and for bf16 on a
CPU without bf16 dot products, where half-precision GEMMs are emulated and fused_train's run in fp32).

    python benchmarks/bench_linear_cross_entropy.py [--cases N,H,V ...] [--dtypes float32 bfloat16]
        [--impls fused torch chunked gemms fused-fp32-sum] [--reps 3] [--device cpu] [--json FILE]

Memory: each (case, dtype, implementation) in a process of its own, so each peak is its own. The inputs are
made, one forward + backward runs (a training loop's first step, whose one-time buffers, such as MKL's GEMM
packing, stay), the peak resident memory (VmHWM; CUDA: the allocator's peak) is reset, and the next step's
peak above what was resident before it, less the bytes of the gradients of input and weight (which every
implementation must return), is the memory the implementation adds.

Time: per case and dtype, every implementation in one process, warmed up, then ``--reps`` rounds of one step
each, the order rotating from round to round; the median step and the median per-round ratio to fused are
reported, so that a burst of load on a shared machine falls on every implementation of its round.
``--reps 0``: one step each, the memory run's (for implementations that take minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

IMPLS = ("fused", "torch", "chunked", "gemms")
# fused-fp32-sum: fused with torch's options asking for linear_weight's gradient summed in fp32 across chunks
# (acc_policy="accurate", acc_dtype=torch.float32; torch >= 2.14), which changes only bf16/fp16 on native GEMMs.
OPTIONAL_IMPLS = ("fused-fp32-sum",)
DEFAULT_CASES = ("2048,1024,32000", "4096,2048,32000", "2048,2048,128256")


def make_step(impl: str, n: int, h: int, v: int, dtype_name: str, device: str):
    """One forward + backward of ``impl`` on fresh inputs: (step, x, w); step() leaves x.grad and w.grad set."""
    import torch
    import torch.nn.functional as F

    import fused_train.nn.functional as fused

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    target[::17] = -100  # some padding, as a causal LM's shifted labels have

    if impl == "fused":
        def step():
            fused.linear_cross_entropy(x, w, target).backward()
    elif impl == "fused-fp32-sum":
        fp32_sum = torch.nn.LinearCrossEntropyOptions(acc_policy="accurate", acc_dtype=torch.float32)

        def step():
            fused.linear_cross_entropy(x, w, target, options=fp32_sum).backward()
    elif impl == "torch":
        def step():
            F.cross_entropy(F.linear(x, w), target).backward()
    elif impl == "chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def step():
            F.linear_cross_entropy(x, w, target, options=options).backward()
    else:  # gemms: the floor, over buffers made once (not counted as memory of a step)
        # On CPU in fp32 for fp16, and for bf16 unless the CPU has bf16 dot products: half-precision GEMMs are
        # emulated there, and fused_train's GEMMs run in fp32 (over converted blocks).
        gemm_dtype = dtype if device != "cpu" or _native_cpu_gemms(dtype) else torch.float32
        x_in, w_in = x.detach().to(gemm_dtype), w.detach().to(gemm_dtype)
        logits = torch.empty(n, v, device=device, dtype=gemm_dtype)
        grad_x = torch.empty(n, h, device=device, dtype=gemm_dtype)
        grad_w = torch.empty(v, h, device=device, dtype=gemm_dtype)

        def step():
            torch.mm(x_in, w_in.t(), out=logits)
            torch.mm(logits, w_in, out=grad_x)
            torch.mm(logits.t(), x_in, out=grad_w)

    return step, x, w


def _native_cpu_gemms(dtype) -> bool:
    """Whether fused_train runs CPU GEMMs in ``dtype`` (fp32/fp64; bf16 on a CPU with bf16 dot products, unless
    oneDNN is off or FUSED_TRAIN_CPU_HALF_GEMMS=fp32)."""
    import torch

    from fused_train._build_info import _cpu_bf16_gemms_native

    if dtype not in (torch.bfloat16, torch.float16):
        return True
    return dtype == torch.bfloat16 and _cpu_bf16_gemms_native()


def _timed(step, x, w, device: str) -> float:
    import torch

    x.grad = w.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_memory(impl: str, n: int, h: int, v: int, dtype_name: str, warm: bool, device: str) -> dict:
    """In this process: the memory ``impl`` adds to a step (after a first step when ``warm``), and that step's
    time."""
    from fused_train.benchmarking import peak_memory, reset_peak_memory

    step, x, w = make_step(impl, n, h, v, dtype_name, device)
    if warm:  # a training loop's step: after the first, whose one-time buffers (MKL's packing) stay
        _timed(step, x, w, device)
    x.grad = w.grad = None
    before = reset_peak_memory(device)
    seconds = _timed(step, x, w, device)
    extra = peak_memory(device) - before - (x.numel() + w.numel()) * x.element_size()
    return dict(extra_peak_mib=None if impl == "gemms" else round(extra / 2**20, 1), step_seconds=seconds)


def measure_times(impls: list[str], n: int, h: int, v: int, dtype_name: str, reps: int, device: str) -> dict:
    """In this process: every implementation warmed up, then ``reps`` rounds of one step each in turns
    (fused_train.benchmarking.interleaved_samples), so that a burst of load on a shared machine slows every
    implementation of its round alike; each implementation's median and minimum, and the median per-round
    ratio to fused."""
    from fused_train.benchmarking import interleaved_samples

    steps = {impl: make_step(impl, n, h, v, dtype_name, device) for impl in impls}
    samples = interleaved_samples({impl: (lambda s=step: _timed(*s, device)) for impl, step in steps.items()},
                                  device, warmup=1, repeat=reps)
    times = {impl: [ms / 1e3 for ms in ts] for impl, ts in samples.items()}
    out = {}
    for impl, ts in times.items():
        row = dict(seconds=statistics.median(ts), seconds_min=min(ts), reps=len(ts))
        if "fused" in times and impl != "fused":
            row["fused_over_this"] = statistics.median(f / t for f, t in zip(times["fused"], ts))
        out[impl] = row
    return out


def _run_self(args: list[str], exact_resident_memory: bool = False) -> dict:
    from fused_train.benchmarking import run_json_in_subprocess

    return run_json_in_subprocess(__file__, args, exact_resident_memory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="N,H,V")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + OPTIONAL_IMPLS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="FILE", help="append one JSON line per row")
    parser.add_argument("--memory", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--times", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        impl, n, h, v, dtype, warm = args.memory
        print(json.dumps(measure_memory(impl, int(n), int(h), int(v), dtype, warm == "1", args.device)))
        return 0
    if args.times:
        n, h, v, dtype = args.times
        print(json.dumps(measure_times(args.impls, int(n), int(h), int(v), dtype, args.reps, args.device)))
        return 0
    import torch

    for case in args.cases:
        n, h, v = (int(part) for part in case.split(","))
        for dtype in args.dtypes:
            rows = {}
            for impl in args.impls:
                memory = _run_self(["--memory", impl, str(n), str(h), str(v), dtype, "1" if args.reps else "0",
                                    "--device", args.device], exact_resident_memory=True)
                native = args.device != "cpu" or _native_cpu_gemms(getattr(torch, dtype))
                rows[impl] = dict(impl=impl, n=n, h=h, v=v, dtype=dtype, device=args.device, torch=torch.__version__,
                                  threads=torch.get_num_threads(), gemm_dtype=dtype if native else "float32",
                                  **memory)
            if args.reps:
                times = _run_self(["--times", str(n), str(h), str(v), dtype, "--reps", str(args.reps),
                                   "--device", args.device, "--impls", *args.impls])
                for impl, t in times.items():
                    rows[impl].update(t)
            else:  # one step each, the memory run's
                for row in rows.values():
                    row.update(seconds=row["step_seconds"], seconds_min=row["step_seconds"], reps=1)
            if args.json:
                with open(args.json, "a") as f:
                    for row in rows.values():
                        f.write(json.dumps(row) + "\n")
            line = f"N={n} H={h} V={v} {dtype} (GEMMs in {rows[args.impls[0]]['gemm_dtype']}):"
            for impl, row in rows.items():
                memory = "" if row["extra_peak_mib"] is None else f" +{row['extra_peak_mib']:.0f} MiB"
                line += f"  {impl} {row['seconds']:.3f} s (min {row['seconds_min']:.3f}){memory}"
            fused = rows.get("fused")
            if fused:
                for peer in ("torch", "chunked"):
                    if peer in rows:
                        ratio = rows[peer].get("fused_over_this", fused["seconds"] / rows[peer]["seconds"])
                        line += f"  fused/{peer} {ratio:.2f}x"
                if "fused-fp32-sum" in rows:
                    summed = rows["fused-fp32-sum"]
                    ratio = 1 / summed["fused_over_this"] if "fused_over_this" in summed else (
                        summed["seconds"] / fused["seconds"])
                    line += f"  fused-fp32-sum/fused {ratio:.2f}x"
                if "gemms" in rows:
                    line += f"  GEMM floor/fused {100 * rows['gemms']['seconds'] / fused['seconds']:.0f}%"
                if "torch" in rows and rows["torch"]["extra_peak_mib"] > 0:
                    share = 100 * fused["extra_peak_mib"] / rows["torch"]["extra_peak_mib"]
                    line += f"  memory fused/torch {share:.1f}%"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
