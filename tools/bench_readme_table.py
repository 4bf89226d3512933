"""Prints the README's optimizer benchmark tables from a ``fused-train bench --json`` file, so that every
cell is a field the bench printed: ``ms``, ``ratio_vs_fastest_torch``, ``gbs``, ``pct_ceiling``,
``ceiling_gbs``, ``working_set_mib`` of the optimizers' rows.

    python tools/bench_readme_table.py bench.json
"""

from __future__ import annotations

import argparse
import json

# (optimizer, shape, dtype) of the README's main table, in its order
MAIN_CASES = [
    ("Adam", "16 x 1M", "float32"),
    ("AdamW", "16 x 1M", "float32"),
    ("Adam", "2000 x 1k", "float32"),
    ("SGD+momentum", "16 x 1M", "float32"),
    ("RMSprop", "16 x 1M", "float32"),
    ("Adam", "16 x 1M", "bfloat16"),
]


def fmt_ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def bandwidth_cell(row: dict) -> str:
    if row.get("pct_ceiling") is None:
        return f"{row['gbs']:.1f} GB/s"
    return f"{row['gbs']:.1f} GB/s: {row['pct_ceiling']:.0f}% of {row['ceiling_gbs']:.1f}"


def main_table(rows: list[dict]) -> list[str]:
    lines = ["| step (incl. `zero_grad(set_to_none=False)`) | fused_train | fastest torch | ratio "
             "| fused GB/s: % of its pattern's ceiling (ceiling GB/s) | working set |",
             "|---|---|---|---|---|---|"]
    for optimizer, shape, dtype in MAIN_CASES:
        case = [r for r in rows if (r["optimizer"], r["shape"], str(r["dtype"])) == (optimizer, shape, dtype)
                and r["zero_grad"] and r.get("threads") is None]
        fused = next((r for r in case if r["impl"] == "fused_train"), None)
        if fused is None:
            continue
        torch_rows = [r for r in case if r["impl"].startswith("torch")]
        fastest = min(torch_rows, key=lambda r: r["ms"])
        params = ", bf16 params" if dtype == "bfloat16" else ""
        name = f"{optimizer}{params}, {shape.replace('x', '×')}"
        lines.append(f"| {name} | {fmt_ms(fused['ms'])} | {fmt_ms(fastest['ms'])} ({fastest['impl'][6:]}) "
                     f"| **{fused['ratio_vs_fastest_torch']:.2f}×** | {bandwidth_cell(fused)} "
                     f"| {fused['working_set_mib']:.0f} MiB |")
    return lines


def step_alone_table(rows: list[dict]) -> list[str]:
    alone = [r for r in rows if not r["zero_grad"] and r.get("threads") is not None]
    if not alone:
        return []
    impls = list(dict.fromkeys(r["impl"] for r in alone))
    lines = ["| Adam `step()` alone, " + alone[0]["shape"].replace("x", "×") + " | "
             + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for threads in sorted({r["threads"] for r in alone}):
        for dtype in dict.fromkeys(str(r["dtype"]) for r in alone):
            case = {r["impl"]: r for r in alone if r["threads"] == threads and str(r["dtype"]) == dtype}
            cells = []
            for impl in impls:
                r = case.get(impl)
                if r is None:
                    cells.append("")
                    continue
                pct = f", {r['pct_ceiling']:.0f}%" if r.get("pct_ceiling") is not None else ""
                ratio = "" if impl == "fused_train" else f" (fused_train {r['ratio_vs_this']:.2f}×)"
                cells.append(f"{fmt_ms(r['ms'])}{pct}{ratio}")
            label = f"{dtype}, {threads} thread{'s' if threads > 1 else ''}"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    args = parser.parse_args()
    with open(args.json_file) as f:
        result = json.load(f)
    rows = result["benchmarks"]["optimizers"]
    print("\n".join(main_table(rows)))
    print()
    print("\n".join(step_alone_table(rows)))


if __name__ == "__main__":
    main()
