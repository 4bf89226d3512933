"""What the benchmarks share: timing, peak memory, the copy bandwidth their GB/s are measured against, finding and
loading the ``benchmarks/bench_<topic>.py`` files, and the table ``fused-train bench`` prints.

A benchmark file exposes ``run(device: str = "cpu", quick: bool = False) -> list[dict]``: one dict per
measured case, with its parameters (``N``, ``V``, ``dtype`` ...) and its measurements (``torch_ms``,
``fused_ms``, ``ratio``, ``GB/s`` ...). The files live in the source tree, not in the wheel.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
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


def interleaved_samples(fns: dict[str, Callable[[], object]], device: str | torch.device = "cpu", *,
                        warmup: int = 3, repeat: int = 20) -> dict[str, list[float]]:
    """Wall times in milliseconds of each of several functions timed in turns, one list per function: one
    call of each per round, the order rotating from round to round, so that a slow spell of a shared machine
    falls on all of them alike and none always runs right after the same neighbour (whose data it would find
    in, or have evicted from, the cache). Timed as :func:`time_ms` times (CUDA events, or ``perf_counter``).

    A function may instead return its own time in seconds (a ``float``): then that is used, e.g. for work
    that times itself inside an extension to leave the call's own cost out.

    Args:
        fns (dict[str, callable]): the work to time, by name.
        device (str or torch.device): where they run.
        warmup (int, optional): untimed rounds first (default: 3).
        repeat (int, optional): timed rounds (default: 20).
    """
    device = torch.device(device)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeat):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = fns[name]()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                start = time.perf_counter()
                result = fns[name]()
                ms = (time.perf_counter() - start) * 1e3
            if isinstance(result, float):
                ms = result * 1e3
            if r >= warmup:
                times[name].append(ms)
    return times


def interleaved_ms(fns: dict[str, Callable[[], object]], device: str | torch.device = "cpu", *,
                   warmup: int = 3, repeat: int = 20) -> dict[str, float]:
    """The median of each function's :func:`interleaved_samples`."""
    samples = interleaved_samples(fns, device, warmup=warmup, repeat=repeat)
    return {name: statistics.median(t) for name, t in samples.items()}


def run_json_in_subprocess(script: str | os.PathLike, args: list[str], exact_resident_memory: bool = False) -> dict:
    """Runs ``python script *args`` in a fresh process and returns the JSON object on its last line of output:
    a measurement in a process of its own, whose peak memory is its own. Raises ``RuntimeError`` with the end
    of its stderr if it fails.

    With ``exact_resident_memory`` every block above 128 KiB is mapped on allocation and unmapped when freed,
    so resident memory follows live tensors (glibc's default would keep freed blocks up to 32 MiB resident and
    reuse them, hiding a step's temporaries behind the previous step's). Not for timing: every large tensor
    would be paged in afresh."""
    env = dict(os.environ)
    if exact_resident_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak_memory(device: str | torch.device = "cpu") -> int:
    """Resets the peak-memory measure and returns the memory in use now, in bytes: on CUDA the caching
    allocator's (after a synchronize), on CPU the process's resident memory (Linux: ``/proc/self/clear_refs``
    resets VmHWM to VmRSS). Raises ``OSError`` where there is no such ``/proc`` (not Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident memory (VmHWM) to now
        f.write("5")
    return _proc_status_bytes("VmRSS")


def peak_memory(device: str | torch.device = "cpu") -> int:
    """The peak memory in bytes since :func:`reset_peak_memory`, measured as it measures."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def copy_bandwidth_gbs(device: str | torch.device = "cpu", nbytes: int | None = None,
                       repeat: int = 10) -> float:
    """The read + write memory bandwidth of ``device`` in GB/s (10^9 bytes per second): an in-place
    scale of one large fp32 buffer, counting the bytes read and the bytes written, the way the
    benchmarks count theirs.

    It is the practical ceiling of a memory-bound kernel, so "% of copy" says how close one comes. In
    place, like an optimizer step, so no write-allocate traffic hides in it (an out-of-place
    ``dst.copy_(src)`` on a CPU also reads ``dst`` before writing it, and measures less).

    Args:
        device (str or torch.device): where to measure.
        nbytes (int, optional): buffer size (default: 1 GiB on CUDA, 512 MiB on CPU, past the caches).
        repeat (int, optional): timed passes (default: 10).
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (512 << 20)
    numel = nbytes // 4
    buffer = torch.ones(numel, dtype=torch.float32, device=device)
    ms = time_ms(lambda: buffer.mul_(1.0000001), device, warmup=2, repeat=repeat)
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
    """Whether a row's column holds a kernel's bandwidth in GB/s (``"GB/s"``, ``"gbs"``,
    ``"fused_gbps"`` ...); the reference copy bandwidth some rows carry (``"copy_gbs"``) is not one."""
    k = key.lower()
    if "copy" in k or "%" in k or "pct" in k:
        return False
    return "gb/s" in k or "gbps" in k or k == "gbs" or k.endswith("_gbs")


def has_copy_share(row: dict) -> bool:
    """Whether a row already says its bandwidth as a share of a copy (``"pct_copy_bw"``, ``"% copy"``)."""
    return any("copy" in k.lower() and ("pct" in k.lower() or "%" in k) for k in row)


def is_measurement_column(key: str) -> bool:
    """Whether a row's column is a measurement (time, ratio, bandwidth, memory) rather than a parameter
    of the case (size, dtype, optimizer, implementation)."""
    k = key.lower()
    return (k == "ms" or k.endswith("_ms") or k.endswith("_us") or "ratio" in k or "speedup" in k
            or "copy" in k or "pct" in k or "%" in k or k.endswith("_mb") or k.endswith("_mib")
            or k.endswith("_gb") or is_bandwidth_column(key))


def case_label(row: dict) -> str:
    """A short name for one benchmark case from its parameter columns, e.g. ``"N=4096 V=32000 bfloat16"``
    or ``"Adam 16 x 1M torch foreach"``."""
    parts = []
    for key, value in row.items():
        if is_measurement_column(key) or key == "device" or value is None:
            continue
        parts.append(format_value(value) if isinstance(value, str) else f"{key}={format_value(value)}")
    return " ".join(parts)


def fused_over_torch(row: dict) -> float | None:
    """fused_train's time over torch's for one row (below 1: fused_train is faster), the convention of
    the benchmark files' ``ratio`` columns, or None where the row does not compare the two.

    Rows with both ``torch_ms`` and ``fused_ms`` give their quotient; rows that time one implementation
    each (``impl`` and ``ms``, as bench_optimizers.py's) give their ``ratio_vs_this`` on the torch rows.
    """
    torch_ms, fused_ms = row.get("torch_ms"), row.get("fused_ms")
    if isinstance(torch_ms, (int, float)) and isinstance(fused_ms, (int, float)) and torch_ms > 0:
        return fused_ms / torch_ms
    ratio = row.get("ratio_vs_this")
    if isinstance(ratio, (int, float)) and row.get("impl") != "fused_train":
        return ratio
    return None


def add_copy_share(rows: list[dict], copy_gbs: float) -> list[dict]:
    """Returns the rows with a ``"<col> % copy"`` column after every GB/s column: that bandwidth as a
    percentage of ``copy_gbs``, measured in the same run. Rows that already carry their own share of a
    copy (measured by the benchmark itself) are left as they are."""
    out = []
    for row in rows:
        if has_copy_share(row) or copy_gbs <= 0:
            out.append(dict(row))
            continue
        new = {}
        for key, value in row.items():
            new[key] = value
            if is_bandwidth_column(key) and isinstance(value, (int, float)):
                new[f"{key} % copy"] = 100.0 * value / copy_gbs
        out.append(new)
    return out


def split_constant_columns(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Separates the columns that hold one value in every row (device, a reference bandwidth) from the
    rest, so a table prints them once above itself rather than on every line; columns that are None in
    every row are dropped."""
    if len(rows) < 2:
        return {}, rows
    keys = [k for k in rows[0] if all(k in r and r[k] == rows[0][k] for r in rows)
            and (is_measurement_column(k) or k == "device")]
    constant = {k: rows[0][k] for k in keys}
    varying = [{k: v for k, v in r.items() if k not in constant} for r in rows]
    # A column empty in every row (a measurement skipped on this device) is not worth a line at all.
    return {k: v for k, v in constant.items() if v is not None}, varying


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
    cells = [[format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
               for c in columns]

    def line(values: list[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def format_value(value) -> str:
    """One table cell: integers as they are, floats to about three significant digits, dtypes without
    their ``torch.`` prefix."""
    if value is None:
        return ""
    if isinstance(value, bool):
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
            return f"{value:#.3g}"  # '#' keeps the trailing zeros, so a column's digits line up
        return f"{value:.2e}"
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)
