"""Optimizer step benchmarks: fused_train beside torch.optim's for-loop, foreach and fused variants, in one run.

Each timed unit is what a training loop pays per step: ``step()`` followed by ``zero_grad(set_to_none=False)``
(gradients kept allocated). fused_train runs with ``zero_grad_in_step=True``, so its zero_grad finds the
gradients already zeroed by the kernel. Effective bandwidth counts the bytes each step must move (fp32:
SGD 12 B/param, SGD+momentum 20, Adam 28, RMSprop 20, +4 for zeroing the gradient) and is set against a
read+write bandwidth measured in the same run (copy_bandwidth_gbs).

    python benchmarks/bench_optimizers.py [--device cuda] [--quick]
    pytest benchmarks/bench_optimizers.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import copy

import torch

import fused_train
from fused_train.benchmarking import copy_bandwidth_gbs, time_ms

# (label, number of tensors, elements per tensor)
SHAPES = [("16 x 1M", 16, 1 << 20), ("2000 x 1k", 2000, 1000)]
QUICK_SHAPES = [("4 x 256k", 4, 1 << 18), ("500 x 1k", 500, 1000)]

# (name, torch class, kwargs, fp32 bytes per param without zeroing, torch variants that exist on CPU)
OPTIMIZERS = [
    ("Adam", "Adam", dict(lr=1e-3), 28, ("forloop", "foreach", "fused")),
    ("AdamW", "AdamW", dict(lr=1e-3, weight_decay=1e-2), 28, ("forloop", "foreach", "fused")),
    ("SGD+momentum", "SGD", dict(lr=1e-2, momentum=0.9), 20, ("forloop", "foreach", "fused")),
    ("RMSprop", "RMSprop", dict(lr=1e-3), 20, ("forloop", "foreach")),
]
ZEROING_BYTES = 4


def median_ms(fn, device: str, repeat: int) -> float:
    return time_ms(fn, device, warmup=3, repeat=repeat)


def make_params(n_tensors: int, numel: int, device: str) -> list[torch.Tensor]:
    params = [torch.randn(numel, device=device, requires_grad=True) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def make_step(kind: str, torch_name: str, kwargs: dict, params: list[torch.Tensor]):
    if kind == "fused_train":
        opt = getattr(fused_train.optim, torch_name)(params, zero_grad_in_step=True, **kwargs)
    else:
        flags = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
        opt = getattr(torch.optim, torch_name)(params, **kwargs, **flags)
    # A warm grad (the kernel may have zeroed it) keeps the arithmetic identical across iterations.
    grads = [p.grad for p in params]

    def step():
        opt.step()
        opt.zero_grad(set_to_none=False)

    def restore():
        for p, g in zip(params, grads):
            p.grad = g

    return step, restore


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Times every optimizer × shape × implementation; returns one row per (optimizer, shape, impl).

    Rows: optimizer, shape, impl, ms (per step incl. zero_grad), ratio (fused_train ms / this impl's ms
    on the fused_train row: vs the fastest torch variant), gbs (effective), pct_copy_bw.
    """
    repeat = 5 if quick else 15
    copy_gbs = copy_bandwidth_gbs(device)
    rows = []
    for name, torch_name, kwargs, bytes_per_param, torch_kinds in OPTIMIZERS:
        for label, n_tensors, numel in QUICK_SHAPES if quick else SHAPES:
            total = n_tensors * numel
            moved = (bytes_per_param + ZEROING_BYTES) * total
            timings = {}
            for kind in ("fused_train",) + tuple(torch_kinds):
                params = make_params(n_tensors, numel, device)
                step, restore = make_step(kind, torch_name, kwargs, params)
                timings[kind] = median_ms(step, device, repeat)
                restore()
                del params
            fastest_torch = min(timings[k] for k in torch_kinds)
            for kind, ms in timings.items():
                gbs = moved / (ms * 1e-3) / 1e9
                rows.append(dict(
                    optimizer=name, shape=label, impl=kind if kind == "fused_train" else f"torch {kind}",
                    ms=ms, ratio_vs_this=timings["fused_train"] / ms,
                    ratio_vs_fastest_torch=timings["fused_train"] / fastest_torch if kind == "fused_train" else None,
                    gbs=gbs, pct_copy_bw=100 * gbs / copy_gbs, copy_gbs=copy_gbs, device=device,
                ))
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
    lines = [f"{'optimizer':<13} {'shape':<10} {'impl':<14} {'ms':>9} {'fused/this':>10} {'GB/s':>7} {'%copy':>6}"]
    for r in rows:
        lines.append(
            f"{r['optimizer']:<13} {r['shape']:<10} {r['impl']:<14} {r['ms']:>9.3f} {r['ratio_vs_this']:>9.2f}x "
            f"{r['gbs']:>7.1f} {r['pct_copy_bw']:>5.0f}%"
        )
    if rows:
        lines.append(f"read+write bandwidth measured in this run: {rows[0]['copy_gbs']:.1f} GB/s ({rows[0]['device']})")
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
