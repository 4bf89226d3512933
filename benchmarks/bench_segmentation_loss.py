"""Forward + backward of a segmentation loss over (N, C, H, W) logits: fused_train's cross-entropy, which takes
them in their layout (csrc/cpu/xent_kernels.h, forward_positions), beside torch's F.cross_entropy eager and
torch.compile'd, fused_train's earlier road (the logits copied into (N·H·W, C) rows first), and the memory's
ceiling for the pattern: a compiled loop that reads the logits once and writes a gradient once
(streaming_ceiling.cpp, copy_pass_), timed in turns with them. GB/s counts those bytes (2 × N·C·H·W ×
itemsize); the targets and each row's saved log-sum-exp, which every implementation also moves, are left out,
so the shares are conservative.

    python benchmarks/bench_segmentation_loss.py [--repeat 7] [--json out.jsonl]
    python benchmarks/bench_segmentation_loss.py --probes   # the kernel alone: its cost per logit in cache, and
                                                            # the layout against rows by positions per sample

Shapes: Pascal VOC's 21 classes at 512 × 512 (issue 10's target shape), Cityscapes' 19 at 512 × 1024, ADE20K's
150 at 128 × 128, and 3 classes at 512 × 512.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizers import load_streaming_pass, staggered_ones  # noqa: E402

from fused_train.benchmarking import interleaved_ms  # noqa: E402
from fused_train.nn.functional import cross_entropy  # noqa: E402

SHAPES = [(8, 21, 512, 512), (2, 19, 512, 1024), (8, 150, 128, 128), (8, 3, 512, 512)]
DTYPES = [torch.float32, torch.bfloat16]


def _step(loss_fn, logits, target):
    loss_fn(logits, target).backward()
    logits.grad = None


def _as_rows(logits, target):
    """fused_train's road before the layout: the logits moved into rows (a copy), the gradient back through it."""
    return cross_entropy(logits.movedim(1, -1).reshape(-1, logits.shape[1]), target.reshape(-1))


def run_case(shape, dtype, repeat: int, compiled) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
    fns = {
        "torch": lambda: _step(F.cross_entropy, logits, target),
        "fused": lambda: _step(cross_entropy, logits, target),
        "fused_rows": lambda: _step(_as_rows, logits, target),
    }
    if compiled is not None:
        fns["compiled"] = lambda: _step(compiled, logits, target)
    copy_pass = load_streaming_pass() and torch.ops.fused_train_bench.copy_pass_
    if copy_pass:
        source, out = staggered_ones(logits.numel(), dtype, 0), staggered_ones(logits.numel(), dtype, 1)
        fns["ceiling"] = lambda: copy_pass(source, out, 1)[0]
    ms = interleaved_ms(fns, "cpu", warmup=2, repeat=repeat)
    nbytes = 2 * logits.numel() * logits.element_size()
    row = dict(shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
               threads=torch.get_num_threads(), bytes=nbytes)
    for name, t in ms.items():
        row[f"{name}_ms"] = round(t, 3)
        row[f"{name}_gbs"] = round(nbytes / (t * 1e-3) / 1e9, 2)
    for name in ("torch", "compiled", "fused_rows"):
        if name in ms:
            row[f"fused_vs_{name}"] = round(ms["fused"] / ms[name], 3)
    if "ceiling" in ms:
        row["fused_pct_ceiling"] = round(100 * ms["ceiling"] / ms["fused"], 1)
    return row


def _op_ms(fn, repeat: int) -> float:
    return interleaved_ms({"op": fn}, "cpu", warmup=3, repeat=repeat)["op"]


def probes(repeat: int = 50) -> None:
    """The CPU kernel alone, through the ops: (1) one thread, logits in cache (about 700 KB), ns per logit of the
    forward and of the forward with the gradient; (2) two threads, 4M logits, the layout against the same logits
    moved into rows (the copy included), by positions per sample: where _MIN_POSITIONS comes from."""
    ops = torch.ops.fused_train
    kw = dict(reduction=1, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("one thread, in cache: ns per logit")
    for classes, positions in ((3, 57344), (21, 8192), (150, 1152)):
        for dtype in DTYPES:
            x = torch.randn(1, classes, positions).to(dtype)
            t = torch.randint(0, classes, (1, positions))
            forward = _op_ms(lambda: ops.cross_entropy_forward(x, t, None, **kw), repeat)
            with_grad = _op_ms(lambda: ops.cross_entropy_forward_backward(x, t, None, **kw), repeat)
            n = x.numel()
            print(json.dumps(dict(classes=classes, positions=positions, dtype=str(dtype)[6:],
                                  forward_ns_per_logit=round(forward * 1e6 / n, 3),
                                  with_gradient_ns_per_logit=round(with_grad * 1e6 / n, 3))), flush=True)
    torch.set_num_threads(threads)
    print(f"{threads} threads, 4M logits: forward with the gradient, the layout / rows (the copy included)")
    for classes in (21, 1000):
        for positions in (8, 16, 32, 64):
            for dtype in DTYPES:
                n = max(1, (1 << 22) // (classes * positions))
                x = torch.randn(n, classes, positions).to(dtype)
                t = torch.randint(0, classes, (n, positions))
                layout = _op_ms(lambda: ops.cross_entropy_forward_backward(x, t, None, **kw), repeat // 5)
                rows = _op_ms(lambda: ops.cross_entropy_forward_backward(
                    x.movedim(1, -1).reshape(-1, classes), t.reshape(-1), None, **kw), repeat // 5)
                print(json.dumps(dict(classes=classes, positions=positions, dtype=str(dtype)[6:],
                                      layout_ms=round(layout, 3), rows_ms=round(rows, 3),
                                      layout_vs_rows=round(layout / rows, 2))), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", help="append one JSON line per case to this file")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile'd F.cross_entropy")
    parser.add_argument("--probes", action="store_true", help="the kernel alone (see probes())")
    args = parser.parse_args(argv)
    if args.probes:
        print(f"torch {torch.__version__}")
        probes()
        return
    compiled = None if args.no_compile else torch.compile(F.cross_entropy)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape in SHAPES:
        for dtype in DTYPES:
            row = run_case(shape, dtype, args.repeat, compiled)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
