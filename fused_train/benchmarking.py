"""What the benchmarks share: timing, the copy bandwidth their GB/s are measured against, finding and
loading the ``benchmarks/bench_<topic>.py`` files, and the table ``fused-train bench`` prints.

A benchmark file exposes ``run(device: str = "cpu", quick: bool = False) -> list[dict]``: one dict per
measured case, with its parameters (``N``, ``V``, ``dtype`` ...) and its measurements (``torch_ms``,
``fused_ms``, ``ratio``, ``GB/s`` ...). The files live in the source tree, not in the wheel.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

import torch

#: the benchmark files ``fused-train bench`` runs, as ``benchmarks/bench_<name>.py``, in this order
BENCHMARK_NAMES = ("optimizers", "cross_entropy")


def time_ms(fn: Callable[[], object], device: str | torch.device = "cpu", *, warmup: int = 3,
            repeat: int = 20, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    On CUDA each call is timed with events on the current stream, so the time is the device's, not the
    launch's; on CPU with ``time.perf_counter``.

    Args:
        fn (callable): the work to time; called ``warmup`` times untimed first.
        device (str or torch.device): where ``fn`` runs.
        warmup (int, optional): untimed calls before timing (default: 3).
        repeat (int, optional): timed calls, at least (default: 20).
        min_seconds (float, optional): keep timing past ``repeat`` calls until this much time has been
            measured, for very short ``fn`` (default: 0).

    Example::

        >>> time_ms(lambda: torch.mm(a, b), "cpu", repeat=50)
        0.42
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        while len(times) < repeat or sum(times) < min_seconds * 1e3:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        while len(times) < repeat or sum(times) < min_seconds * 1e3:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str | torch.device = "cpu", nbytes: int = 256 << 20,
                       repeat: int = 10) -> float:
    """The memory bandwidth of a plain tensor copy on ``device`` in GB/s (10^9 bytes per second),
    counting the bytes read and the bytes written, the way the benchmarks count theirs.

    It is the practical ceiling of a memory-bound kernel, so "% of copy" says how close one comes.

    Args:
        device (str or torch.device): where to measure.
        nbytes (int, optional): size of the copied buffer (default: 256 MiB, well past the caches).
        repeat (int, optional): timed copies (default: 10).
    """
    numel = nbytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, repeat=repeat)
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def benchmarks_dir_candidates() -> list[Path]:
    """Where ``fused-train bench`` looks for the benchmark files, in order: the source tree this package
    was imported from (an in-place or editable install of a clone), then ``./benchmarks``."""
    candidates = [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    unique: list[Path] = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    return unique


def find_benchmark_file(name: str, directories: Iterable[Path]) -> Path | None:
    """The first ``bench_<name>.py`` in ``directories``, or None."""
    for directory in directories:
        path = Path(directory) / f"bench_{name}.py"
        if path.is_file():
            return path
    return None


def load_benchmark(path: str | os.PathLike) -> ModuleType:
    """Imports a benchmark file by path and checks that it has a ``run`` function.

    The file's directory is put on ``sys.path`` while it is imported, so benchmark files can import
    their neighbours.

    Raises:
        AttributeError: the file has no callable ``run``.
    """
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"fused_train_benchmarks.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    if not callable(getattr(module, "run", None)):
        raise AttributeError(f"{path} has no run(device, quick) function")
    return module


def is_bandwidth_column(key: str) -> bool:
    """Whether a row's column holds a bandwidth in GB/s (``"GB/s"``, ``"fused_GB/s"``, ``"gbps"`` ...)."""
    k = key.lower()
    return "gb/s" in k or "gbps" in k


def is_measurement_column(key: str) -> bool:
    """Whether a row's column is a measurement (time, ratio, bandwidth) rather than a parameter of the
    case (size, dtype, optimizer)."""
    k = key.lower()
    return (k.endswith("_ms") or k.endswith("_us") or k.endswith("_s") or "ratio" in k or "speedup" in k
            or "speed-up" in k or "% copy" in k or is_bandwidth_column(key))


def case_label(row: dict) -> str:
    """A short name for one benchmark case from its parameter columns, e.g. ``"N=4096 V=32000 bf16"``."""
    parts = []
    for key, value in row.items():
        if is_measurement_column(key) or key in ("benchmark", "device"):
            continue
        if isinstance(value, str) and key in ("dtype", "optimizer", "name", "case", "op"):
            parts.append(value.replace("torch.", ""))
        else:
            parts.append(f"{key}={_format_value(value)}")
    return " ".join(parts)


def speedup(row: dict) -> float | None:
    """``torch_ms / fused_ms`` of a row (above 1: fused_train is faster), or None without both."""
    torch_ms, fused_ms = row.get("torch_ms"), row.get("fused_ms")
    if not isinstance(torch_ms, (int, float)) or not isinstance(fused_ms, (int, float)) or fused_ms <= 0:
        return None
    return torch_ms / fused_ms


def add_copy_share(rows: list[dict], copy_gbs: float) -> list[dict]:
    """Returns the rows with a ``"<col> % copy"`` column after every GB/s column: that bandwidth as a
    percentage of ``copy_gbs``, measured in the same run."""
    out = []
    for row in rows:
        new = {}
        for key, value in row.items():
            new[key] = value
            if is_bandwidth_column(key) and isinstance(value, (int, float)) and copy_gbs > 0:
                new[f"{key} % copy"] = 100.0 * value / copy_gbs
        out.append(new)
    return out


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a plain-text table with a header; numbers right-aligned to a few significant
    digits, missing cells left blank.

    Args:
        rows (list[dict]): the rows; every key becomes a column, in order of first appearance.
        columns (list[str], optional): the columns to show, in order (default: all).
    """
    if columns is None:
        columns = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
    cells = [[_format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or c not in row for row in rows) for c in columns]

    def line(values: list[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.3g}" if magnitude < 1 else f"{value:.2f}"
        return f"{value:.2e}"
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)
