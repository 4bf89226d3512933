"""The tutorial-size loss (64 × 10 fp32 logits, class indices) beside torch, where per-call overhead
(Python, op dispatch, autograd nodes) rather than the kernels decides: forward + backward through
``F.cross_entropy`` and through the ``nn.CrossEntropyLoss`` module, the forward alone with and without a
gradient to write.

    python benchmarks/bench_small_loss.py [reps] [threads]

Each rep times torch and fused_train once each with ``torch.utils.benchmark.Timer.blocked_autorange``,
alternating which goes first; the ratio (fused / torch) is taken per rep, in the same process, and its
median printed with its range, so a loaded machine slows both sides of each ratio alike.
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import fused_train
from fused_train.nn.functional import cross_entropy as fused_cross_entropy


def cases(rows: int = 64, classes: int = 10) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, classes, generator=gen).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=gen)
    plain = logits.detach()

    def fwd_bwd(loss_fn):
        def step():
            loss_fn(logits, target).backward()
            logits.grad = None

        return step

    return {
        "fwd+bwd F.cross_entropy": (fwd_bwd(F.cross_entropy), fwd_bwd(fused_cross_entropy)),
        "fwd+bwd CrossEntropyLoss": (fwd_bwd(torch.nn.CrossEntropyLoss()), fwd_bwd(fused_train.nn.CrossEntropyLoss())),
        "fwd, logits need grad": (lambda: F.cross_entropy(logits, target), lambda: fused_cross_entropy(logits, target)),
        "fwd, no grad": (lambda: F.cross_entropy(plain, target), lambda: fused_cross_entropy(plain, target)),
    }


def _us(fn) -> float:
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e6


def run(reps: int = 9) -> list[dict]:
    rows = []
    for name, (torch_fn, fused_fn) in cases().items():
        torch_us, fused_us = [], []
        for rep in range(reps):
            order = ((torch_us, torch_fn), (fused_us, fused_fn))
            for times, fn in order if rep % 2 == 0 else order[::-1]:
                times.append(_us(fn))
        ratios = [f / t for t, f in zip(torch_us, fused_us)]
        rows.append(dict(case=name, torch_us=statistics.median(torch_us), fused_us=statistics.median(fused_us),
                         ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios)))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} reps")
    for r in run(reps):
        print(f"{r['case']:26s} torch {r['torch_us']:6.1f} us  fused_train {r['fused_us']:6.1f} us  "
              f"ratio {r['ratio']:.3f} [{r['ratio_min']:.2f}..{r['ratio_max']:.2f}]")
