"""One prepared command for a machine with an NVIDIA GPU: build, CUDA tests, compute-sanitizer, benchmarks.

    make gpu-check                       # = python3 tools/gpu_check.py --out build/gpu-check
    python3 tools/gpu_check.py --out DIR [--skip-build] [--quick-bench] [--stages build,pytest,...]

Made for the project's lent GPU machines (torch preinstalled, no network, 16 cores, one H100/H200, a
15-minute slot): it installs nothing from the network (pip --no-index --no-build-isolation --no-deps against
the torch that is there), compiles only for the visible GPU's architecture with MAX_JOBS = nproc, and bounds
every stage with a timeout so the whole run ends within 10 minutes (about 7 when all goes well), leaving time
to rerun after a fix.

Stages, each logged to DIR/<stage>.log and timed:
  env       nvidia-smi, python, torch, nvcc, compute-sanitizer versions
  build     pip install -e . with FUSED_TRAIN_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST from the visible device
  info      fused-train info (what was built, the CUDA archs)
  pytest    every CUDA test: pytest -m "not slow" -k cuda (parallel with pytest-xdist where installed)
  sanitize  compute-sanitizer memcheck, racecheck, synccheck and initcheck over tools/cuda_smoke.py (every op
            once on small shapes, PYTORCH_NO_CUDA_MEMORY_CACHING=1), the four at once, beside pytest
  bench     fused-train bench --device cuda --json DIR/bench.json
DIR/summary.txt and DIR/summary.json hold each stage's status and seconds; the exit status is 1 when a stage
failed. Without a GPU (a dry run) the GPU stages are skipped and the summary says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
STAGES = ("env", "build", "info", "pytest", "sanitize", "bench")
# Seconds per stage: together under 10 minutes (one device command), with the build the largest share.
# Measured on an H100 machine (2026-11-27): build 134 s, pytest 30 s, memcheck/racecheck/synccheck under 150 s
# together, bench 84 s. Since then pytest has grown by tests estimated at 40-90 s (65 537 graph captures, a
# loss over 2^31 rows, two fresh processes). The sanitizers run beside pytest, so their timeout counts from
# pytest's start.
TIMEOUTS = {"env": 30, "build": 200, "info": 30, "pytest": 210, "sanitize": 210, "bench": 120}


def probe_gpu() -> tuple[bool, str, str]:
    """(present, description, arch) of the visible GPU, asked of torch in a child process so this script
    never initialises CUDA itself."""
    code = ("import torch\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0); c = torch.cuda.get_device_capability(0)\n"
            "    print('yes', f'{c[0]}.{c[1]}', p.name, f'({p.total_memory / 2**30:.0f} GiB)', sep='|')\n"
            "else:\n"
            "    print('no', '', 'torch.cuda.is_available() is False', f'(torch {torch.__version__})', sep='|')\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "torch timed out asking for a GPU", ""
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"torch failed to import: {last}", ""
    present, arch, name, memory = out.stdout.strip().splitlines()[-1].split("|")
    return present == "yes", f"{name} {memory}", arch


class Run:
    def __init__(self, out: Path):
        self.out = out
        self.results: list[dict] = []

    def stage(self, name: str, commands: list[list[str]] | None, env: dict | None = None,
              skip: str | None = None, timeout: float | None = None) -> bool:
        """Runs commands one after another into DIR/name.log; returns True when all exited 0."""
        log_path = self.out / f"{name}.log"
        if skip is not None:
            self.record(name, "skipped", 0.0, skip)
            return False
        start = time.monotonic()
        status, detail = "passed", ""
        with open(log_path, "w") as log:
            for command in commands or []:
                log.write(f"$ {' '.join(command)}\n")
                log.flush()
                left = (timeout or TIMEOUTS[name]) - (time.monotonic() - start)
                try:
                    rc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=max(left, 1)).returncode
                except subprocess.TimeoutExpired:
                    status, detail = "failed", f"timed out after {timeout or TIMEOUTS[name]} s"
                    break
                except FileNotFoundError as error:
                    status, detail = "failed", f"{error.filename} not found"
                    break
                if rc != 0:
                    status, detail = "failed", f"exit status {rc}: {' '.join(command)[:120]}"
                    break
        self.record(name, status, time.monotonic() - start, detail, log_path)
        return status == "passed"

    def record(self, name, status, seconds, detail, log_path=None):
        row = {"stage": name, "status": status, "seconds": round(seconds, 1), "detail": detail}
        if log_path is not None:
            row["log"] = log_path.name
        self.results.append(row)
        tail = f" — {detail}" if detail else ""
        print(f"[gpu-check] {name:<9} {status:<8} {seconds:6.1f} s{tail}", flush=True)


class Sanitizers:
    """compute-sanitizer's four tools over the smoke script, all at once and beside the pytest stage (they
    wait on the GPU far less than on the CPU), one log each.

    memcheck, racecheck and synccheck instrument only fused_train's kernels (--kernel-name kns=fused_train),
    which keeps them fast. initcheck cannot be narrowed that way: memory that a torch kernel initialised
    (torch.zeros_like for optimizer state, say) would look uninitialised to it, because a kernel left out of
    the instrumentation is not tracked. It instruments every kernel, over the --small smoke.
    """

    def __init__(self, run: Run, env: dict, skip: str | None):
        self.run, self.skip, self.procs = run, skip, {}
        self.start = time.monotonic()
        if skip is not None:
            return
        sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        if not os.path.exists(sanitizer):
            self.skip = "FAILED: compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
            return
        # Every allocation its own (exact bounds for memcheck); the source tree importable without an install.
        env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        for tool in SANITIZER_TOOLS:
            narrow = [] if tool == "initcheck" else ["--kernel-name", "kns=fused_train"]
            smoke = ["tools/cuda_smoke.py"] + (["--small"] if tool == "initcheck" else [])
            command = [sanitizer, "--tool", tool, *narrow, "--error-exitcode", "1", "--print-limit", "20",
                       sys.executable, *smoke]
            log = open(run.out / f"sanitize-{tool}.log", "w")
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            self.procs[tool] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                                log)

    def finish(self) -> None:
        if self.skip is not None:
            failed = self.skip.startswith("FAILED")
            self.run.record("sanitize", "failed" if failed else "skipped", 0.0, self.skip)
            return
        failed = []
        for tool, (proc, log) in self.procs.items():
            left = TIMEOUTS["sanitize"] - (time.monotonic() - self.start)
            try:
                rc = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "timeout"
            log.close()
            if rc != 0:
                failed.append(f"{tool} ({'timed out' if rc == 'timeout' else f'exit {rc}'})")
        detail = ("failed: " + ", ".join(failed)) if failed else "memcheck, racecheck, synccheck, initcheck clean"
        self.run.record("sanitize", "failed" if failed else "passed", time.monotonic() - self.start, detail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "gpu-check"), help="log folder")
    parser.add_argument("--skip-build", action="store_true", help="use the fused_train already installed")
    parser.add_argument("--quick-bench", action="store_true", help="fused-train bench --quick")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"argument --stages: unknown {unknown}; expected a subset of {','.join(STAGES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.log"):
        old.unlink()
    started = time.monotonic()

    has_gpu, gpu, arch = probe_gpu()
    print(f"[gpu-check] GPU: {gpu if has_gpu else 'NONE — ' + gpu}; logs in {out}", flush=True)
    no_gpu = None if has_gpu else "no GPU present"
    run = Run(out)
    jobs = str(os.cpu_count() or 1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    build_env = dict(env, FUSED_TRAIN_FORCE_CUDA="1", MAX_JOBS=jobs,
                     TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST") or arch or "9.0")

    def wanted(name):
        return None if name in stages else "not asked for (--stages)"

    run.stage("env", [["nvidia-smi"], [sys.executable, "-c", "import sys, torch; print(sys.version); "
                                       "print('torch', torch.__version__, 'cuda', torch.version.cuda)"],
                      ["nvcc", "--version"], ["compute-sanitizer", "--version"]],
              env=env, skip=wanted("env") or (None if has_gpu else "no GPU present (nvidia-smi would fail)"))
    built = run.stage(
        "build",
        [[sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-v", "-e", "."]],
        env=build_env, skip=wanted("build") or ("--skip-build" if args.skip_build else None))
    if "build" in stages and not args.skip_build and not built:
        no_gpu = no_gpu or "the build failed"
    run.stage("info", [[sys.executable, "-m", "fused_train", "info"]], env=env, skip=wanted("info"))
    xdist = subprocess.run([sys.executable, "-c", "import xdist"], capture_output=True).returncode == 0
    workers = ["-n", str(min(8, int(jobs)))] if xdist else []
    sanitizers = Sanitizers(run, env, wanted("sanitize") or no_gpu)
    run.stage("pytest", [[sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-k", "cuda or test_build", "-p",
                          "no:cacheprovider", "--junitxml", str(out / "pytest.xml"), *workers]],
              env=env, skip=wanted("pytest") or no_gpu)
    sanitizers.finish()
    bench = [sys.executable, "-m", "fused_train", "bench", "--device", "cuda", "--json", str(out / "bench.json")]
    run.stage("bench", [bench + (["--quick"] if args.quick_bench else [])], env=env,
              skip=wanted("bench") or no_gpu)

    total = time.monotonic() - started
    failed = [r["stage"] for r in run.results if r["status"] == "failed"]
    skipped = [r["stage"] for r in run.results if r["status"] == "skipped"]
    lines = [f"gpu-check {time.strftime('%Y-%m-%d %H:%M:%S')} · {gpu if has_gpu else 'no GPU: ' + gpu} · "
             f"{total:.1f} s in all"]
    lines += [f"{r['stage']:<9} {r['status']:<8} {r['seconds']:6.1f} s  {r['detail']}" for r in run.results]
    if not has_gpu:
        lines.append(f"DRY RUN: no GPU present; skipped: {', '.join(skipped)}")
    lines.append("FAILED: " + ", ".join(failed) if failed else "all stages that ran passed")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"gpu": gpu if has_gpu else None, "seconds": round(total, 1), "stages": run.results}, indent=1) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
