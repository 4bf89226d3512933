"""What bf16_stochastic_round costs: the AdamW step over bf16 params with the update rounded to nearest and
stochastically, fused_train's AdamW (fp32 moments) and AdamW8bit (8-bit moments), beside torch.optim.AdamW
(fused=True, bf16 moments, nearest), in one run, timed in turns.

Each timed unit is ``step()`` then ``zero_grad(set_to_none=False)``; fused_train zeroes the gradients inside its
kernels. Bytes per param of fused AdamW over bf16 params: param read and written (2 + 2), grad read and zeros written
(2 + 2), two fp32 moments read and written (16): 24 B, the pattern of the ceiling pass (bench_optimizers.py's
compiled streaming loop with bf16 param and grad, two fp32 states, zeroing), timed in the same turns.

    python benchmarks/bench_stochastic_round.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import fused_train
from fused_train.benchmarking import interleaved_ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_optimizers import bytes_per_param, ceiling_pass, make_params, step_and_restore  # noqa: E402

SHAPES = [("16 x 1M", 16, 1 << 20), ("2000 x 4k", 2000, 4096)]
QUICK_SHAPES = [("4 x 256k", 4, 1 << 18)]
IMPLS = {
    # name: (class, options, bytes per param)
    "AdamW nearest": (fused_train.optim.AdamW, {}, 24),
    "AdamW stochastic": (fused_train.optim.AdamW, {"bf16_stochastic_round": True}, 24),
    "AdamW8bit nearest": (fused_train.optim.AdamW8bit, {}, 8 + 4 + 8 / 256),
    "AdamW8bit stochastic": (fused_train.optim.AdamW8bit, {"bf16_stochastic_round": True}, 8 + 4 + 8 / 256),
    "torch fused AdamW": (torch.optim.AdamW, {"fused": True}, 8 + 8),  # bf16 moments, no zeroing pass counted
}


def make_step(name: str, params: list[torch.Tensor]):
    cls, options, _ = IMPLS[name]
    if cls is torch.optim.AdamW:
        opt = cls(params, lr=1e-3, **options)
    else:
        opt = cls(params, lr=1e-3, zero_grad_in_step=True, **options)
    return step_and_restore(opt, params)


def run(quick: bool = False, repeat: int = 15) -> list[dict]:
    rows = []
    for label, n_tensors, numel in QUICK_SHAPES if quick else SHAPES:
        total = n_tensors * numel
        fns, restores = {}, []
        for name in IMPLS:
            fns[name], restore = make_step(name, make_params(n_tensors, numel, "cpu", torch.bfloat16))
            restores.append(restore)
        ceiling = ceiling_pass(n_tensors, numel, torch.bfloat16, 2, True, "cpu")
        if ceiling is not None:
            fns["ceiling"] = ceiling
        timings = interleaved_ms(fns, "cpu", warmup=3, repeat=repeat)
        for restore in restores:
            restore()
        ceiling_ms = timings.pop("ceiling", None)
        ceiling_gbs = None
        if ceiling_ms:
            ceiling_gbs = bytes_per_param(torch.bfloat16, 2, True) * total / (ceiling_ms * 1e-3) / 1e9
        for name, ms in timings.items():
            nearest = timings[name.replace("stochastic", "nearest")] if "stochastic" in name else None
            gbs = IMPLS[name][2] * total / (ms * 1e-3) / 1e9
            rows.append(dict(shape=label, impl=name, ms=ms, stochastic_vs_nearest=ms / nearest if nearest else None,
                             gbs=gbs, pct_ceiling=100 * gbs / ceiling_gbs if ceiling_gbs else None,
                             ceiling_gbs=ceiling_gbs, threads=torch.get_num_threads(), torch=torch.__version__))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'shape':<10} {'impl':<22} {'ms':>8} {'/nearest':>9} {'GB/s':>6} {'%ceil':>6}"]
    for r in rows:
        ratio = f"{r['stochastic_vs_nearest']:.3f}" if r["stochastic_vs_nearest"] else ""
        pct = f"{r['pct_ceiling']:.0f}" if r["pct_ceiling"] is not None else ""
        lines.append(f"{r['shape']:<10} {r['impl']:<22} {r['ms']:>8.2f} {ratio:>9} {r['gbs']:>6.1f} {pct:>6}")
    if rows and rows[0]["ceiling_gbs"]:
        lines.append(f"ceiling (streaming pass, bf16 param and grad, two fp32 states, zeroing: 24 B/param): "
                     f"{rows[0]['ceiling_gbs']:.1f} GB/s; threads {rows[0]['threads']}; torch {torch.__version__}")
    return "\n".join(lines)


def test_stochastic_rounding_runs_beside_its_peers():
    """pytest benchmarks/bench_stochastic_round.py: the quick case runs and every row is complete."""
    rows = run(quick=True, repeat=2)
    assert {r["impl"] for r in rows} == set(IMPLS)
    assert all(r["ms"] > 0 for r in rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json", help="also write the rows to this JSON-lines file")
    args = parser.parse_args()
    result = run(args.quick, args.repeat)
    print(format_rows(result))
    if args.json:
        with open(args.json, "w") as f:
            for row in result:
                f.write(json.dumps(row) + "\n")
