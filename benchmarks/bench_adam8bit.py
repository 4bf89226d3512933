"""8-bit optimizer step benchmark: fused_train.optim.AdamW8bit (``--optimizer adamw``, the default), SGD8bit
(``sgd``, momentum 0.9) or RMSprop8bit (``rmsprop``) beside fused_train's fp32 optimizer of the same update, torch's
(AdamW and SGD ``fused=True``; RMSprop, which has no fused form, ``foreach=True``) and bitsandbytes' 8-bit one (where
installed), in one run, timed in turns.

Each timed unit is ``step()`` then ``zero_grad(set_to_none=False)``; fused_train zeroes the gradients inside its
kernels (``zero_grad_in_step=True``). Bytes per param: the 8-bit step reads and writes the param (4 + 4), reads the
grad and writes its zeros (4 + 4), reads and writes one uint8 code per moment (2 per moment) and 2 x 4 bytes of
absmax per moment per 256 params: 20.06 B for AdamW's two moments, 18.03 B for SGD's and RMSprop's one; fp32 AdamW
32 B, SGD and RMSprop 24 B. The ceiling is the compiled streaming pass of bench_optimizers.py with fp32 param, grad
zeroing and one fp32 state (24 B per param), timed in the same turns; its GB/s is the rate the 8-bit step's bytes
are set against (``pct_ceiling``). State bytes per param count the state's tensors as allocated.

bitsandbytes runs on CPU as eager torch ops; its step is timed with fewer rounds (``--bnb-repeat``).

    python benchmarks/bench_adam8bit.py [--optimizer adamw|sgd|rmsprop] [--quick] [--json FILE]
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


def _bytes(moments: int, state_bytes: float) -> float:
    """Bytes per param of a step with zeroing: param and grad (4 + 4 each), and each moment read and written."""
    return 4 + 4 + 4 + 4 + moments * 2 * state_bytes


# Per optimizer: fused_train's 8-bit and fp32 classes, torch's class and its implementation switch, bitsandbytes'
# class name, the arguments all take, and the bytes per param of the 8-bit and fp32 steps.
OPTIMIZERS = {
    "adamw": dict(ours_8bit="AdamW8bit", ours_fp32="AdamW", torch=("AdamW", dict(fused=True)), bnb="AdamW8bit",
                  kwargs=dict(lr=1e-3), bytes_8bit=_bytes(2, 1 + 4 / 256), bytes_fp32=_bytes(2, 4)),
    "sgd": dict(ours_8bit="SGD8bit", ours_fp32="SGD", torch=("SGD", dict(fused=True)), bnb="SGD8bit",
                kwargs=dict(lr=0.01, momentum=0.9), bytes_8bit=_bytes(1, 1 + 4 / 256), bytes_fp32=_bytes(1, 4)),
    "rmsprop": dict(ours_8bit="RMSprop8bit", ours_fp32="RMSprop", torch=("RMSprop", dict(foreach=True)),
                    bnb="RMSprop8bit", kwargs=dict(lr=1e-3), bytes_8bit=_bytes(1, 1 + 4 / 256),
                    bytes_fp32=_bytes(1, 4)),
}


def bitsandbytes_optimizer(name: str = "AdamW8bit"):
    try:
        import bitsandbytes
    except Exception:
        return None
    return getattr(bitsandbytes.optim, name)


def make_step(kind: str, params: list[torch.Tensor], optimizer: str = "adamw"):
    spec = OPTIMIZERS[optimizer]
    kwargs = spec["kwargs"]
    if kind == "fused_train 8-bit":
        opt = getattr(fused_train.optim, spec["ours_8bit"])(params, **kwargs, zero_grad_in_step=True)
    elif kind == "fused_train fp32":
        opt = getattr(fused_train.optim, spec["ours_fp32"])(params, **kwargs, zero_grad_in_step=True)
    elif kind.startswith("torch"):
        name, switch = spec["torch"]
        opt = getattr(torch.optim, name)(params, **kwargs, **switch)
    else:
        opt = bitsandbytes_optimizer(spec["bnb"])(params, **kwargs)
    return (opt, *step_and_restore(opt, params))


def state_bytes_per_param(opt, params) -> float:
    total = sum(t.numel() * t.element_size() for p in params for k, t in opt.state[p].items()
                if torch.is_tensor(t) and k not in ("step", "qmap1", "qmap2"))
    return total / sum(p.numel() for p in params)


def run(device: str = "cpu", quick: bool = False, repeat: int = 15, bnb_repeat: int = 3,
        optimizer: str = "adamw") -> list[dict]:
    spec = OPTIMIZERS[optimizer]
    torch_kind = "torch " + next(iter(spec["torch"][1]))  # "torch fused" or "torch foreach"
    rows = []
    for label, n_tensors, numel in QUICK_SHAPES if quick else SHAPES:
        total = n_tensors * numel
        kinds = ["fused_train 8-bit", "fused_train fp32", torch_kind]
        opts, fns, restores = {}, {}, []
        for kind in kinds:
            opts[kind], fns[kind], restore = make_step(kind, make_params(n_tensors, numel, device), optimizer)
            restores.append(restore)
        ceiling = ceiling_pass(n_tensors, numel, torch.float32, 1, True, device)
        if ceiling is not None:
            fns["ceiling"] = ceiling
        timings = interleaved_ms(fns, device, warmup=3, repeat=repeat)
        bnb_cls = bitsandbytes_optimizer(spec["bnb"])
        if bnb_cls is not None and device == "cpu":
            params = make_params(n_tensors, numel, device)
            opts["bitsandbytes 8-bit"], step, restore = make_step("bitsandbytes 8-bit", params, optimizer)
            timings["bitsandbytes 8-bit"] = interleaved_ms({"b": step}, device, warmup=1, repeat=bnb_repeat)["b"]
            restores.append(restore)
        for restore in restores:
            restore()
        ceiling_ms = timings.pop("ceiling", None)
        ceiling_gbs = None
        if ceiling_ms:
            ceiling_gbs = bytes_per_param(torch.float32, 1, True) * total / (ceiling_ms * 1e-3) / 1e9
        ours = timings["fused_train 8-bit"]
        for kind, ms in timings.items():
            per_param = spec["bytes_8bit"] if "8-bit" in kind else spec["bytes_fp32"]
            gbs = per_param * total / (ms * 1e-3) / 1e9
            rows.append(dict(
                optimizer=optimizer, shape=label, impl=kind, ms=ms, ratio_8bit_vs_this=ours / ms, gbs=gbs,
                pct_ceiling=100 * gbs / ceiling_gbs if ceiling_gbs and kind == "fused_train 8-bit" else None,
                ceiling_gbs=ceiling_gbs,
                state_bytes_per_param=state_bytes_per_param(opts[kind], opts[kind].param_groups[0]["params"]),
                threads=torch.get_num_threads(), device=device,
            ))
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'opt':<8} {'shape':<10} {'impl':<20} {'ms':>9} {'8-bit/this':>10} {'GB/s':>7} {'%ceil':>6} "
            f"{'state B/param':>13}")
    lines = [head]
    for r in rows:
        pct = f"{r['pct_ceiling']:.0f}" if r["pct_ceiling"] is not None else ""
        lines.append(f"{r['optimizer']:<8} {r['shape']:<10} {r['impl']:<20} {r['ms']:>9.2f} "
                     f"{r['ratio_8bit_vs_this']:>10.3f} {r['gbs']:>7.1f} {pct:>6} {r['state_bytes_per_param']:>13.3f}")
    for optimizer in dict.fromkeys(r["optimizer"] for r in rows):
        first = next(r for r in rows if r["optimizer"] == optimizer)
        if first["ceiling_gbs"]:
            lines.append(f"{optimizer}: ceiling (streaming pass, 24 B/param) {first['ceiling_gbs']:.1f} GB/s; "
                         f"threads {first['threads']}; torch {torch.__version__}")
    return "\n".join(lines)


def test_8bit_optimizers_run_beside_their_peers():
    """pytest benchmarks/bench_adam8bit.py: the quick case runs and every row is complete, for each optimizer."""
    for optimizer, state_bytes in (("adamw", 2.05), ("sgd", 1.02), ("rmsprop", 1.02)):
        rows = run(quick=True, repeat=2, bnb_repeat=1, optimizer=optimizer)
        assert {r["impl"] for r in rows} >= {"fused_train 8-bit", "fused_train fp32"}
        assert len(rows) >= 3 and all(r["ms"] > 0 for r in rows)
        assert next(r for r in rows if r["impl"] == "fused_train 8-bit")["state_bytes_per_param"] <= state_bytes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), nargs="+", default=["adamw"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--bnb-repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON-lines file")
    args = parser.parse_args()
    result = [row for optimizer in args.optimizer
              for row in run("cpu", args.quick, args.repeat, args.bnb_repeat, optimizer)]
    print(format_rows(result))
    if args.json:
        with open(args.json, "w") as f:
            for row in result:
                f.write(json.dumps(row) + "\n")
