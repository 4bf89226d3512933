"""Convergence of bf16 weights without fp32 master copies: the LM demo's model (two pre-norm transformer layers,
d=128, tied 8192-token head, random init) trained on the Python standard library's sources with fused_train's
AdamW, from the same seeds and batches, four ways:

  * fp32 master: fp32 weights, forward and backward in bf16 under autocast (the usual mixed precision);
  * bf16, nearest: the model in bf16, each update rounded to nearest into the weights (what torch.optim does);
  * bf16, stochastic: the same with ``bf16_stochastic_round=True``;
  * bf16, stochastic, 8-bit state: AdamW8bit with ``bf16_stochastic_round=True`` (4 bytes per param in all).

The learning rate warms up for 10% of the steps and decays along a cosine to 10% of its peak, as LM training does:
late in training the updates shrink below half of bf16's spacing for most weights, which is where nearest rounding
stops learning. Reports each seed's final validation loss and its ratio to the fp32-master run's.

    python benchmarks/convergence_bf16_stochastic_round.py [--steps 300] [--seeds 0 1 2] [--json F] [--plot F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch

import fused_train
from fused_train import lm_demo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convergence_adam8bit import plot  # noqa: E402

RUNS = {
    # name: (weights dtype, optimizer class, optimizer options)
    "fp32 master (autocast bf16)": (torch.float32, fused_train.optim.AdamW, {}),
    "bf16, nearest": (torch.bfloat16, fused_train.optim.AdamW, {}),
    "bf16, stochastic": (torch.bfloat16, fused_train.optim.AdamW, {"bf16_stochastic_round": True}),
    "bf16, stochastic, 8-bit state": (torch.bfloat16, fused_train.optim.AdamW8bit, {"bf16_stochastic_round": True}),
}


def schedule(steps: int):
    warmup = max(steps // 10, 1)

    def factor(step: int) -> float:  # LambdaLR's step counts from 0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@torch.no_grad()
def validation_loss(model, data, batch_size: int, context: int, autocast: bool) -> float:
    model.eval()
    windows = data.validation[: (len(data.validation) - 1) // context * context + 1]
    inputs = windows[:-1].view(-1, context)[: 8 * batch_size]
    targets = windows[1:].view(-1, context)[: 8 * batch_size]
    losses = []
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            losses.append(fused_train.nn.functional.linear_cross_entropy(model(x), model.embed.weight, y).item())
    model.train()
    return statistics.fmean(losses)


def train(name: str, data, *, steps: int, seed: int, lr: float, batch_size: int, context: int) -> dict:
    dtype, cls, options = RUNS[name]
    autocast = dtype == torch.float32
    torch.manual_seed(seed)  # the same initial weights for every run of a seed
    model = lm_demo.TinyCausalLM(data.vocab_size, context).to(dtype)
    optimizer = cls(model.parameters(), lr=lr, weight_decay=0.01, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
    stream = lm_demo.batches(data.train, batch_size, context, torch.Generator().manual_seed(seed))
    train_losses, val_losses = [], []
    eval_every = max(steps // 6, 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = next(stream)
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = fused_train.nn.functional.linear_cross_entropy(model(x), model.embed.weight, y)
        loss.backward()
        if step == steps:
            before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        train_losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            val_losses.append((step, validation_loss(model, data, batch_size, context, autocast)))
    # The share of weights the last step left unchanged: the stall that nearest rounding causes.
    unchanged = sum(int((p.detach() == b).sum()) for p, b in zip(model.parameters(), before))
    total = sum(p.numel() for p in model.parameters())
    return dict(seed=seed, run=name, steps=steps, lr=lr, seconds=time.perf_counter() - start,
                final_val_loss=val_losses[-1][1], final_train_loss=statistics.fmean(train_losses[-20:]),
                unchanged_in_last_step=unchanged / total, train_losses=train_losses, val_losses=val_losses)


def run(steps: int, seeds: tuple[int, ...], lr: float, batch_size: int, context: int) -> list[dict]:
    data = lm_demo.load_stdlib_text()
    rows = []
    for seed in seeds:
        for name in RUNS:
            rows.append(train(name, data, steps=steps, seed=seed, lr=lr, batch_size=batch_size, context=context))
            r = rows[-1]
            print(f"seed {seed}  {name:<30} val {r['final_val_loss']:.4f}  train(last 20) {r['final_train_loss']:.4f}"
                  f"  unchanged by the last step {100 * r['unchanged_in_last_step']:.1f}%  ({r['seconds']:.0f} s)",
                  flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    base = {r["seed"]: r["final_val_loss"] for r in rows if r["run"] == next(iter(RUNS))}
    lines = []
    for name in RUNS:
        mine = [r for r in rows if r["run"] == name]
        if not mine:
            continue
        losses = [r["final_val_loss"] for r in mine]
        ratios = [r["final_val_loss"] / base[r["seed"]] for r in mine]
        unchanged = statistics.fmean(r["unchanged_in_last_step"] for r in mine)
        lines.append(f"{name:<30} val loss {statistics.fmean(losses):.4f} (per seed: "
                     f"{', '.join(f'{x:.4f}' for x in losses)}); / fp32 master: "
                     f"{', '.join(f'{x:.4f}' for x in ratios)} (mean {statistics.fmean(ratios):.4f}); "
                     f"unchanged by the last step: {100 * unchanged:.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--json", help="write the rows (with loss curves) to this JSON file")
    parser.add_argument("--plot", help="write the validation curves to this image")
    args = parser.parse_args()
    RUNS = {name: RUNS[name] for name in args.runs}
    result = run(args.steps, tuple(args.seeds), args.lr, args.batch_size, args.context)
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "args": vars(args), "rows": result}, f)
    if args.plot:
        plot(result, args.plot, key="run", title="bf16 weights without fp32 masters: tiny causal LM, stdlib sources")
