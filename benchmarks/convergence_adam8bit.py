"""Convergence of 8-bit AdamW: the LM demo's model (two pre-norm transformer layers, d=128, tied 8192-token
head, random init) trained on the Python standard library's sources with fused_train's fp32 AdamW, fused_train's
AdamW8bit and bitsandbytes' AdamW8bit (where installed), from the same seeds and batches; the loss through
fused_train's linear_cross_entropy for all. Reports each seed's final validation loss and the mean of the last
20 training losses, and the 8-bit runs' ratio to fp32's.

    python benchmarks/convergence_adam8bit.py [--steps 300] [--seeds 0 1 2] [--json FILE] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import fused_train
from fused_train import lm_demo


def optimizers() -> dict[str, type]:
    found = {"fp32 AdamW (fused_train)": fused_train.optim.AdamW,
             "AdamW8bit (fused_train)": fused_train.optim.AdamW8bit}
    try:
        import bitsandbytes

        found["AdamW8bit (bitsandbytes)"] = bitsandbytes.optim.AdamW8bit
    except Exception:
        pass
    return found


def run(steps: int = 300, seeds: tuple[int, ...] = (0, 1, 2), lr: float = 3e-3, batch_size: int = 16,
        context: int = 128) -> list[dict]:
    data = lm_demo.load_stdlib_text()
    device = torch.device("cpu")
    rows = []
    for seed in seeds:
        for name, cls in optimizers().items():
            torch.manual_seed(seed)
            model = lm_demo.TinyCausalLM(data.vocab_size, context).to(device)
            run_ = lm_demo.LMRun("fused_train", model, cls(model.parameters(), lr=lr, weight_decay=0.01),
                                 lm_demo.lm_loss("fused_train"))
            lm_demo.train_lm(run_, data, steps=steps, batch_size=batch_size, context=context, seed=seed,
                             device=device, eval_every=max(steps // 6, 1))
            rows.append(dict(seed=seed, optimizer=name, steps=steps, lr=lr,
                             final_val_loss=run_.val_losses[-1][1],
                             final_train_loss=statistics.fmean(run_.train_losses[-20:]),
                             train_losses=run_.train_losses, val_losses=run_.val_losses))
            print(f"seed {seed}  {name:<26} val {rows[-1]['final_val_loss']:.4f}  "
                  f"train(last 20) {rows[-1]['final_train_loss']:.4f}", flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    lines = []
    base = {r["seed"]: r for r in rows if r["optimizer"].startswith("fp32")}
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name]
        ratios = [r["final_val_loss"] / base[r["seed"]]["final_val_loss"] for r in mine]
        per_seed = ", ".join(f"{r['final_val_loss']:.4f}" for r in mine)
        lines.append(f"{name:<26} val loss {statistics.fmean(r['final_val_loss'] for r in mine):.4f} "
                     f"(per seed: {per_seed}); / fp32: {', '.join(f'{x:.4f}' for x in ratios)}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, *, key: str = "optimizer",
         title: str = "Tiny causal LM on the stdlib sources, 3 seeds") -> None:
    """Each row's validation curve, one colour per ``row[key]`` (in order of appearance), labelled once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {}
    for r in rows:
        color = colors.setdefault(r[key], f"C{len(colors)}")
        steps, losses = zip(*r["val_losses"])
        label = r[key] if r["seed"] == rows[0]["seed"] else None
        ax.plot(steps, losses, color=color, alpha=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="write the rows (with loss curves) to this JSON file")
    parser.add_argument("--plot", help="write the validation curves to this image")
    args = parser.parse_args()
    result = run(args.steps, tuple(args.seeds))
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": result}, f)
    if args.plot:
        plot(result, args.plot)
