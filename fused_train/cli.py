"""``fused-train`` (also ``python -m fused_train``): ``demo`` trains the tutorial's classifier with
fused_train's loss and optimizer (``--compare``: beside stock PyTorch), ``bench`` runs the kernel
benchmarks beside torch, ``info`` says how this installation was built.

Flag errors exit with status 2 and a message naming the flag, as argparse does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence

import torch

from . import __version__
from ._build_info import _cpu_bf16_gemms_native, build_info

# The defaults reach >= 95% validation accuracy on the digits in about a second of training on a
# 2-core CPU (measured: see the README); the tutorial's own values for batch size and learning rate.
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LM_STEPS = 200
LM_CONTEXT = 64


# ----------------------------------------------------------------------------------------------------
# Argument parsing
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``fused-train`` argument parser with its ``demo``, ``bench`` and ``info`` subcommands."""
    from .data import DATASET_NAMES
    from .demo import OPTIMIZERS

    parser = argparse.ArgumentParser(
        prog="fused-train",
        description="Fused C++/CUDA kernels for the PyTorch training loop: run the demo, the benchmarks, "
                    "or see how this installation was built.",
    )
    parser.add_argument("--version", action="version", version=f"fused_train {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,bench,info}", required=True)

    demo = commands.add_parser(
        "demo", help="train the tutorial's classifier with fused_train (--compare: beside torch)",
        description="Train Flatten → Linear → ReLU → Linear(512, 512) → ReLU → Linear(512, classes) with the "
                    "tutorial's train loop and validation loop, using fused_train.nn.CrossEntropyLoss and a "
                    "fused_train.optim optimizer.",
    )
    demo.add_argument("--data", choices=DATASET_NAMES, default="digits",
                      help="digits: scikit-learn's 8×8 handwritten digits, built in (default); "
                           "fashion-mnist: read through torchvision from --root, never downloaded")
    demo.add_argument("--root", metavar="DIR",
                      help="directory holding FashionMNIST/raw (for --data fashion-mnist)")
    demo.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                      help=f"passes over the training data (default: {DEFAULT_EPOCHS})")
    demo.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                      help=f"samples per optimizer step (default: {DEFAULT_BATCH_SIZE})")
    demo.add_argument("--lr", type=_positive_float, default=None,
                      help="learning rate (default: " + ", ".join(
                          f"{lr:g} for {name}" for name, (_, _, lr) in OPTIMIZERS.items()) + ")")
    demo.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=None,
                      help=f"(default: {DEFAULT_OPTIMIZER}; adamw for --task lm)")
    demo.add_argument("--task", choices=("classify", "lm"), default="classify",
                      help="classify: the tutorial's image classifier (default); lm: a small causal language "
                           "model on the Python standard library's sources, its head and loss through "
                           "fused_train.nn.functional.linear_cross_entropy (--compare: beside linear + "
                           "torch.nn.CrossEntropyLoss, with time per step and peak memory)")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help=f"optimizer steps for --task lm (default: {DEFAULT_LM_STEPS})")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: cpu)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seeds the initial weights and the batch order (default: 0)")
    demo.add_argument("--threads", type=_positive_int, default=None,
                      help="torch's intra-op CPU threads (default: torch's own choice, "
                           f"{torch.get_num_threads()} here); on a busy machine 1 is steadier, because a "
                           "parallel region waits for its slowest thread")
    demo.add_argument("--compare", action="store_true",
                      help="also train with torch.optim and torch.nn.CrossEntropyLoss from the same seed and "
                           "print both side by side")
    demo.add_argument("--plot", metavar="FILE.png", help="draw loss and accuracy per epoch into FILE.png")
    demo.add_argument("--json", metavar="FILE",
                      help="write every per-epoch number, the settings and build_info")
    demo.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")
    demo.set_defaults(handler=run_demo_command, subparser=demo)

    bench = commands.add_parser(
        "bench", help="time the fused optimizers and loss beside torch",
        description="Run benchmarks/bench_optimizers.py and benchmarks/bench_cross_entropy.py (from the "
                    "source tree) and print their times beside torch, with each kernel's bandwidth as a "
                    "share of a plain copy measured in the same run.",
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: cpu)")
    bench.add_argument("--quick", action="store_true", help="fewer and smaller cases (seconds, not minutes)")
    bench.add_argument("--json", metavar="FILE", help="write the rows, the copy bandwidth and build_info")
    bench.add_argument("--plot", metavar="FILE.png", help="bar chart of the speed-up over torch per case")
    bench.add_argument("--benchmarks-dir", metavar="DIR",
                       help="where the bench_*.py files are (default: the source tree's benchmarks/, "
                            "then ./benchmarks)")
    bench.set_defaults(handler=run_bench_command, subparser=bench)

    info = commands.add_parser("info", help="how this installation was built and what it runs on",
                               description="build_info() in words.")
    info.set_defaults(handler=run_info_command, subparser=info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fused-train`` console script and of ``python -m fused_train``.

    Args:
        argv (sequence of str, optional): the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        int: the exit status (argparse exits with 2 itself on a usage error).

    Example::

        >>> from fused_train.cli import main
        >>> main(["demo", "--epochs", "1", "--quiet"])
        0
    """
    args = build_parser().parse_args(argv)
    return args.handler(args)


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        parser.error("argument --device: cuda was requested but no CUDA device is available here "
                     "(torch.cuda.is_available() is False); use --device cpu")
    if not build_info()["cuda_compiled"]:
        parser.error("argument --device: cuda was requested but this fused_train was built without CUDA "
                     "kernels (CPU-only build); rebuild it where nvcc is found, or use --device cpu")


def _check_output_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # Checked before any training so a typo costs nothing.
    for flag in ("json", "plot"):
        path = getattr(args, flag, None)
        if path is None:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            parser.error(f"argument --{flag}: directory {directory!r} does not exist")
    if getattr(args, "plot", None) is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("argument --plot: needs matplotlib, which is not installed (pip install matplotlib)")


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def _environment() -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# ----------------------------------------------------------------------------------------------------
# demo
def _format_seconds(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds:.3f} s"


def _progress_bars(enabled: bool, epochs: int):
    """The per-run batch progress-bar factory for demo.train, or None when bars are off."""
    if not enabled:
        return None
    from tqdm import tqdm

    def progress_for(run, epoch):
        def wrap(loader):
            return tqdm(loader, total=len(loader), desc=f"{run.implementation} epoch {epoch}/{epochs}",
                        unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
        return wrap

    return progress_for


def run_demo_command(args: argparse.Namespace) -> int:
    """``fused-train demo``: see :func:`build_parser` for the flags."""
    from . import demo
    from .data import DatasetUnavailable, load_dataset

    parser = args.subparser
    _check_device(parser, args.device)
    _check_output_paths(parser, args)
    if args.task == "lm":
        return run_lm_demo_command(args)
    if args.steps is not None:
        parser.error("argument --steps: only used with --task lm (the classifier trains for --epochs)")
    if args.optimizer is None:
        args.optimizer = DEFAULT_OPTIMIZER
    if args.root is not None and args.data != "fashion-mnist":
        parser.error("argument --root: only used with --data fashion-mnist")
    try:
        data = load_dataset(args.data, args.root)
    except DatasetUnavailable as e:
        parser.error(str(e))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = data.to(device)
    lr = args.lr if args.lr is not None else demo.OPTIMIZERS[args.optimizer][2]
    implementations = demo.IMPLEMENTATIONS if args.compare else demo.IMPLEMENTATIONS[:1]
    info = build_info()  # after set_num_threads: it reports the threads in use

    runs = demo.prepare_runs(data, implementations=implementations, optimizer=args.optimizer, lr=lr,
                             batch_size=args.batch_size, seed=args.seed)
    threads = f"{info['num_threads']} thread{'s' if info['num_threads'] != 1 else ''}"
    where = (f"cpu ({info['cpu_capability']}, {threads})" if device.type == "cpu"
             else f"cuda ({torch.cuda.get_device_name(device)})")
    print(f"fused_train demo · {data.description}: {len(data.train)} train / {len(data.validation)} "
          f"validation images, {'×'.join(map(str, data.image_shape))}, {data.num_classes} classes")
    epochs_text = f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}"
    print(f"{epochs_text} · batch size {args.batch_size} · learning rate {lr:g} · {where} · "
          f"seed {args.seed}")
    for run in runs:
        print(f"{run.implementation:<11}  {run.optimizer_name} + {run.loss_name}")
    for run in runs:
        demo.warm_up(run, data, args.optimizer, lr, args.batch_size)

    show_bars = not args.quiet and sys.stderr.isatty()
    width = len(str(args.epochs))
    # --compare prints a table: the epoch, then each implementation's four columns, then the speed-up.
    label_width = max(len("epoch"), 2 * width + 1)
    columns = f"{'train loss':>10}  {'val loss':>8}  {'accuracy':>8}  {'seconds':>8}"
    if args.compare and not args.quiet:
        print()
        print(f"{'':<{label_width}}  {'fused_train':^{len(columns)}}   {'torch':^{len(columns)}}".rstrip())
        print(f"{'epoch':<{label_width}}  {columns}   {columns}   speed-up")

    def on_epoch(epoch: int, records: list) -> None:
        if args.quiet:
            return
        if not args.compare:
            r = records[0]
            print(f"epoch {epoch:>{width}}/{args.epochs} · train loss {r.train_loss:.3f} · val loss "
                  f"{r.val_loss:.3f} · accuracy {100 * r.accuracy:.1f}% · {_format_seconds(r.seconds)}",
                  flush=True)
            return
        cells = [f"{r.train_loss:>10.4f}  {r.val_loss:>8.4f}  {100 * r.accuracy:>7.1f}%  {r.seconds:>8.3f}"
                 for r in records]
        ratio = records[1].seconds / records[0].seconds
        label = f"{epoch:>{width}}/{args.epochs}"
        print(f"{label:>{label_width}}  {cells[0]}   {cells[1]}   {ratio:>7.2f}×", flush=True)

    demo.train(runs, args.epochs, _progress_bars(show_bars, args.epochs), on_epoch)

    summary = _demo_summary(runs)
    print()
    for run in runs:
        s = summary[run.implementation]
        print(f"{run.implementation:<11}  accuracy {100 * s['final_accuracy']:.1f}% after {epochs_text} · "
              f"{_format_seconds(s['median_epoch_seconds'])} per epoch (median) · "
              f"{_format_seconds(s['total_seconds'])} in all")
    if args.compare:
        print(f"fused_train is {summary['speedup_median_epoch']:.2f}× as fast as torch per epoch "
              f"({summary['speedup_median_train_loop']:.2f}× in the train loop alone); final accuracies "
              f"differ by {abs(summary['accuracy_difference_points']):.1f} points")

    if args.json is not None:
        _write_json(args.json, {
            "command": "demo",
            "settings": {
                "data": args.data, "root": args.root, "epochs": args.epochs, "batch_size": args.batch_size,
                "lr": lr, "optimizer": args.optimizer, "device": args.device, "seed": args.seed,
                "threads": torch.get_num_threads(), "compare": args.compare,
            },
            "dataset": {
                "name": data.name, "description": data.description, "train_size": len(data.train),
                "validation_size": len(data.validation), "image_shape": list(data.image_shape),
                "num_classes": data.num_classes,
            },
            "runs": {
                run.implementation: {
                    "optimizer": run.optimizer_name, "loss": run.loss_name,
                    "epochs": [r.as_dict() for r in run.epochs],
                    **summary[run.implementation],
                }
                for run in runs
            },
            "summary": {k: v for k, v in summary.items() if k not in demo.IMPLEMENTATIONS},
            "build_info": info,
            "environment": _environment(),
        })
        print(f"wrote {args.json}")
    if args.plot is not None:
        _plot_demo(args.plot, runs, f"{data.description} · {runs[0].optimizer_name.rsplit('.', 1)[-1]} "
                                    f"lr {lr:g} · batch {args.batch_size} · {device.type}")
        print(f"wrote {args.plot}")
    return 0


def run_lm_demo_command(args: argparse.Namespace) -> int:
    """``fused-train demo --task lm``: see fused_train/lm_demo.py."""
    from . import lm_demo
    from .demo import IMPLEMENTATIONS, OPTIMIZERS

    parser = args.subparser
    for flag, value, default in (("--data", args.data, "digits"), ("--root", args.root, None),
                                 ("--epochs", args.epochs, DEFAULT_EPOCHS), ("--plot", args.plot, None)):
        if value != default:
            parser.error(f"argument {flag}: not used with --task lm")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    optimizer = args.optimizer or "adamw"
    lr = args.lr if args.lr is not None else 3e-3
    steps = args.steps or DEFAULT_LM_STEPS
    batch_size, context = args.batch_size, LM_CONTEXT
    eval_every = max(1, steps // 8)
    data = lm_demo.load_stdlib_text()
    implementations = IMPLEMENTATIONS if args.compare else IMPLEMENTATIONS[:1]
    runs = lm_demo.prepare_lm_runs(data, implementations=implementations, optimizer=optimizer, lr=lr,
                                   context=context, seed=args.seed, device=device)
    info = build_info()
    print(f"fused_train demo --task lm · {data.description}")
    print(f"{steps} steps · {batch_size} × {context} tokens per step · {OPTIMIZERS[optimizer][0].__name__} "
          f"lr {lr:g} · {device.type} ({info['num_threads']} threads) · seed {args.seed}")
    for run in runs:
        loss_name = ("fused_train.nn.functional.linear_cross_entropy" if run.implementation == "fused_train"
                     else "linear + torch.nn.CrossEntropyLoss")
        print(f"{run.implementation:<11}  {run.optimizer_name} + {loss_name}")
    for run in runs:
        lm_demo.warm_up_lm(run, data, batch_size, context, device)

    def on_eval(run, step):
        if not args.quiet:
            recent = statistics.fmean(run.train_losses[-eval_every:])
            print(f"{run.implementation:<11}  step {step:>{len(str(steps))}}/{steps} · train loss {recent:.4f} · "
                  f"val loss {run.val_losses[-1][1]:.4f}", flush=True)

    for run in runs:
        lm_demo.train_lm(run, data, steps=steps, batch_size=batch_size, context=context, seed=args.seed + 1,
                         device=device, eval_every=eval_every, on_eval=on_eval)
    print()
    summary = {}
    for run in runs:
        median_step = statistics.median(run.step_seconds)
        summary[run.implementation] = dict(final_val_loss=run.val_losses[-1][1], median_step_seconds=median_step,
                                           peak_memory_mib=run.peak_mib)
        print(f"{run.implementation:<11}  val loss {run.val_losses[-1][1]:.4f} · {1000 * median_step:.1f} ms "
              f"per step (median) · peak memory +{run.peak_mib:.0f} MiB while training")
    if args.compare:
        fused, stock = summary["fused_train"], summary["torch"]
        print(f"fused_train: {stock['median_step_seconds'] / fused['median_step_seconds']:.2f}× as fast per step, "
              f"{fused['peak_memory_mib']:.0f} MiB against {stock['peak_memory_mib']:.0f} MiB peak, "
              f"validation losses differ by {abs(fused['final_val_loss'] - stock['final_val_loss']):.4f}")
    if args.json is not None:
        _write_json(args.json, {
            "command": "demo",
            "settings": {"task": "lm", "steps": steps, "batch_size": batch_size, "context": context, "lr": lr,
                         "optimizer": optimizer, "device": args.device, "seed": args.seed,
                         "threads": torch.get_num_threads(), "compare": args.compare},
            "dataset": {"description": data.description, "vocab_size": data.vocab_size,
                        "train_tokens": len(data.train), "validation_tokens": len(data.validation)},
            "runs": {run.implementation: {"optimizer": run.optimizer_name, "train_losses": run.train_losses,
                                          "val_losses": run.val_losses, **summary[run.implementation]}
                     for run in runs},
            "build_info": info,
            "environment": _environment(),
        })
        print(f"wrote {args.json}")
    return 0


def _demo_summary(runs: list) -> dict:
    summary: dict = {}
    for run in runs:
        summary[run.implementation] = {
            "final_accuracy": run.epochs[-1].accuracy,
            "final_val_loss": run.epochs[-1].val_loss,
            "total_seconds": sum(r.seconds for r in run.epochs),
            "median_epoch_seconds": statistics.median(r.seconds for r in run.epochs),
            "median_train_loop_seconds": statistics.median(r.train_seconds for r in run.epochs),
        }
    if len(runs) == 2:
        fused, stock = summary[runs[0].implementation], summary[runs[1].implementation]
        # Medians, not totals: one epoch hit by another process's burst on a shared machine must not
        # decide the comparison.
        summary["speedup_median_epoch"] = stock["median_epoch_seconds"] / fused["median_epoch_seconds"]
        summary["speedup_median_train_loop"] = (stock["median_train_loop_seconds"]
                                                / fused["median_train_loop_seconds"])
        summary["accuracy_difference_points"] = 100 * (fused["final_accuracy"] - stock["final_accuracy"])
    return summary


def _plot_demo(path: str, runs: list, title: str) -> None:
    # Figure + its Agg canvas directly rather than pyplot: no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 3 if len(runs) > 1 else 2
    fig = Figure(figsize=(4.2 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.add_subplot(1, panels, 1), fig.add_subplot(1, panels, 2)
    styles = {"fused_train": dict(color="C0", linestyle="-"), "torch": dict(color="C1", linestyle="--")}
    for run in runs:
        epochs = [r.epoch for r in run.epochs]
        style = styles[run.implementation]
        loss_ax.plot(epochs, [r.train_loss for r in run.epochs], marker="o", markersize=3, alpha=0.55,
                     label=f"{run.implementation} train", **style)
        loss_ax.plot(epochs, [r.val_loss for r in run.epochs], marker="s", markersize=3,
                     label=f"{run.implementation} validation", **style)
        acc_ax.plot(epochs, [100 * r.accuracy for r in run.epochs], marker="s", markersize=3,
                    label=run.implementation, **style)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="accuracy")
    loss_ax.legend(fontsize="small")
    acc_ax.legend(fontsize="small")
    if panels == 3:
        time_ax = fig.add_subplot(1, panels, 3)
        for run in runs:
            time_ax.plot([r.epoch for r in run.epochs], [r.seconds for r in run.epochs], marker="o",
                         markersize=3, label=run.implementation, **styles[run.implementation])
        time_ax.set(xlabel="epoch", ylabel="seconds", title="time per epoch (train + validation)")
        time_ax.set_ylim(bottom=0)
        time_ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------
# bench
def run_bench_command(args: argparse.Namespace) -> int:
    """``fused-train bench``: see :func:`build_parser` for the flags."""
    from pathlib import Path

    from . import benchmarking

    parser = args.subparser
    _check_device(parser, args.device)
    _check_output_paths(parser, args)
    if args.benchmarks_dir is not None:
        if not os.path.isdir(args.benchmarks_dir):
            parser.error(f"argument --benchmarks-dir: {args.benchmarks_dir!r} is not a directory")
        directories = [Path(args.benchmarks_dir)]
    else:
        directories = benchmarking.benchmarks_dir_candidates()
    found = {name: benchmarking.find_benchmark_file(name, directories)
             for name in benchmarking.BENCHMARK_NAMES}
    missing = [name for name, path in found.items() if path is None]
    looked_in = ", ".join(str(d) for d in directories)
    for name in missing:
        print(f"fused-train bench: benchmarks/bench_{name}.py not found (looked in {looked_in}); "
              "skipping it. The benchmarks ship with the source tree, not the wheel: run from a clone, "
              "or pass --benchmarks-dir.", file=sys.stderr)
    if len(missing) == len(found):
        print("fused-train bench: error: no benchmark files found, nothing to run", file=sys.stderr)
        return 1

    info = build_info()
    copy_gbs = benchmarking.copy_bandwidth_gbs(args.device)
    print(f"fused_train bench · {args.device} · torch {info['torch_runtime']} · "
          f"{'quick' if args.quick else 'full'} run")
    print(f"copy bandwidth (in-place scale, read + write, measured now): {copy_gbs:.1f} GB/s; a '% copy' "
          "column is a kernel's GB/s as a share of it")
    if args.device == "cpu":
        print("pct_ceiling (optimizers) = a kernel's GB/s as a % of ceiling_gbs: a compiled streaming pass "
              "with that optimizer's access pattern over tensors of the same shapes, measured now")
    print("ratio = fused_train time / torch time: below 1, fused_train is faster")
    results: dict[str, list[dict]] = {}
    for name, path in found.items():
        if path is None:
            continue
        module = benchmarking.load_benchmark(path)
        rows = benchmarking.add_copy_share(module.run(device=args.device, quick=args.quick), copy_gbs)
        for row in rows:
            ratio = benchmarking.fused_over_torch(row)
            if "ratio" not in row and "ratio_vs_this" not in row and ratio is not None:
                row["ratio"] = ratio
        results[name] = rows
        constant, varying = benchmarking.split_constant_columns(rows)
        print()
        print(f"{name} ({path})")
        if constant:
            print("  " + " · ".join(f"{k} {benchmarking.format_value(v)}" for k, v in constant.items()))
        print(benchmarking.format_table(varying) if rows else "(no rows)")

    if args.json is not None:
        _write_json(args.json, {
            "command": "bench", "device": args.device, "quick": args.quick, "copy_GBps": copy_gbs,
            "benchmarks": results, "missing": missing, "build_info": info, "environment": _environment(),
        })
        print(f"wrote {args.json}")
    if args.plot is not None:
        if _plot_bench(args.plot, results, f"fused_train vs torch · {args.device}"):
            print(f"wrote {args.plot}")
        else:
            print("fused-train bench: no row compares fused_train with torch; nothing to plot",
                  file=sys.stderr)
    return 0


def _plot_bench(path: str, results: dict[str, list[dict]], title: str) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from . import benchmarking

    bars = []
    for index, (name, rows) in enumerate(results.items()):
        for row in rows:
            ratio = benchmarking.fused_over_torch(row)
            if ratio is not None and ratio > 0:
                bars.append((f"{name}: {benchmarking.case_label(row)}", ratio, f"C{index}"))
    if not bars:
        return False
    fig = Figure(figsize=(8, 0.3 * len(bars) + 1.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(len(bars)))
    ratios = [b[1] for b in bars]
    # Bars grow from 1 (parity) on a log scale: 0.5 (twice as fast) and 2 (twice as slow) are equally long.
    ax.barh(positions, [r - 1 for r in ratios], left=1, color=[b[2] for b in bars])
    for y, r in zip(positions, ratios):
        ax.annotate(f"{r:.2f}", (r, y), xytext=(3 if r >= 1 else -3, 0), textcoords="offset points",
                    ha="left" if r >= 1 else "right", va="center", fontsize="x-small")
    ax.set_yticks(positions, [b[0] for b in bars], fontsize="small")
    ax.invert_yaxis()
    ax.set_xscale("log")
    low, high = min(ratios + [1.0]) / 1.6, max(ratios + [1.0]) * 1.6
    ax.set_xlim(low, high)
    ticks = [t for t in (1 / 16, 1 / 8, 0.25, 0.5, 1, 2, 4, 8, 16) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set(xlabel="fused_train time / torch time (below 1: fused_train is faster)", title=title)
    fig.savefig(path, dpi=120)
    return True


# ----------------------------------------------------------------------------------------------------
# info
def describe_build(info: dict | None = None) -> str:
    """:func:`fused_train.build_info` as a few lines a person reads.

    Args:
        info (dict, optional): a ``build_info()`` result (default: this installation's).
    """
    info = build_info() if info is None else info
    lines = [f"fused_train {__version__}"]
    torch_line = f"{info['torch_runtime']} at run time, built against {info['torch_version']}"
    if info["torch_version"] and info["torch_version"] != info["torch_runtime"]:
        torch_line += (" — MISMATCH: rebuild fused_train against the torch you run "
                       "(pip install --no-build-isolation .)")
    lines.append(f"torch         {torch_line}")
    if info["cuda_compiled"]:
        archs = ", ".join(info["cuda_archs"]) or "the default architectures"
        lines.append(f"CUDA kernels  compiled for {archs}")
    else:
        lines.append("CUDA kernels  not compiled: a CPU-only build (CUDA tensors get the dispatcher's error)")
    if info["cuda_available"]:
        names = [f"{torch.cuda.get_device_name(i)} (compute capability "
                 f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                 for i in range(torch.cuda.device_count())]
        lines.append(f"CUDA devices  {'; '.join(names)}")
    else:
        lines.append("CUDA devices  none available")
    capability = info["cpu_capability"] or "unknown"
    described = {"avx512": "AVX-512", "avx2": "AVX2", "default": "baseline (no AVX2), scalar and SSE"}
    lines.append(f"CPU kernels   {described.get(capability, capability)}: the widest instruction set this "
                 "CPU supports among those compiled (chosen at run time)")
    dot_products = ("bf16 dot products (AVX512_BF16)" if info["cpu_bf16_dot_product"] else "no bf16 dot products")
    if _cpu_bf16_gemms_native(info):
        road = "runs its bf16 GEMMs in bf16 (oneDNN; FUSED_TRAIN_CPU_HALF_GEMMS=fp32: in fp32, over tiles)"
    elif info["cpu_bf16_dot_product"]:
        road = "runs its bf16 GEMMs in fp32, over tiles (oneDNN off or FUSED_TRAIN_CPU_HALF_GEMMS=fp32)"
    else:
        road = "runs its bf16 GEMMs in fp32, over tiles"
    lines.append(f"CPU bf16      {dot_products}: linear_cross_entropy {road}")
    lines.append(f"threads       {info['num_threads']} intra-op threads (torch.get_num_threads(); set "
                 "OMP_NUM_THREADS or torch.set_num_threads to change)")
    return "\n".join(lines)


def run_info_command(args: argparse.Namespace) -> int:
    """``fused-train info``: prints :func:`describe_build`."""
    print(describe_build())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
