"""Configure, build and run the C++ tests (CMakeLists.txt at the repository root) with ctest.

    python tests/cpp/run_ctest.py              build/cmake: the CPU library and the ctest suite
    python tests/cpp/run_ctest.py --sanitize   build/cmake-sanitize: the same with ASan + UBSan (`make sanitize`)
    python tests/cpp/run_ctest.py --cuda       build/cmake-cuda: also compiles csrc/cuda/*.cu
    python tests/cpp/run_ctest.py -- -R ops    anything after `--` goes to ctest

Run it with the Python whose torch the tests compile against. Re-runs are incremental: an existing build folder is
not configured again (the build itself re-runs CMake when CMakeLists.txt or the set of sources changes). MAX_JOBS
caps the parallel compile jobs, as it does for setup.py. Exits non-zero when configure, build or any test fails.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def find_tool(name):
    """The tool next to this Python first (pip's cmake and ninja in the venv), then PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which(name)


def cached_cmake(cache):
    """The cmake that configured a build folder, from its CMakeCache.txt."""
    with open(cache) as f:
        for line in f:
            if line.startswith("CMAKE_COMMAND:"):
                return line.split("=", 1)[1].strip()
    return None


def run(cmd, **kwargs):
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kwargs).returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize", action="store_true", help="build with -fsanitize=address,undefined")
    parser.add_argument("--cuda", action="store_true", help="also build the CUDA kernels (FUSED_TRAIN_WITH_CUDA)")
    parser.add_argument("--build-dir", help="default: build/cmake[-sanitize][-cuda]")
    parser.add_argument("ctest_args", nargs="*", help="extra ctest arguments (after --)")
    args = parser.parse_args()

    cmake = find_tool("cmake")
    ctest = find_tool("ctest")
    if cmake is None or ctest is None:
        sys.exit("run_ctest.py: cmake not found; `pip install cmake` (make test installs it into .venv)")
    ninja = find_tool("ninja")

    suffix = ("-sanitize" if args.sanitize else "") + ("-cuda" if args.cuda else "")
    build_dir = os.path.abspath(args.build_dir or os.path.join(ROOT, "build", "cmake" + suffix))
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    started = time.monotonic()

    cache = os.path.join(build_dir, "CMakeCache.txt")
    configured = os.path.exists(cache) and any(
        os.path.exists(os.path.join(build_dir, f)) for f in ("build.ninja", "Makefile")
    )
    if configured and cached_cmake(cache) != cmake:
        # Configured by another cmake (e.g. one from a venv since recreated): its build files call that cmake.
        print(f"run_ctest.py: {build_dir} was configured by another cmake; configuring it again")
        os.remove(cache)
        shutil.rmtree(os.path.join(build_dir, "CMakeFiles"), ignore_errors=True)
        configured = False
    if not configured:
        cmd = [cmake, "-S", ROOT, "-B", build_dir, f"-DPython3_EXECUTABLE={sys.executable}",
               "-DCMAKE_BUILD_TYPE=Release",
               f"-DFUSED_TRAIN_SANITIZE={'ON' if args.sanitize else 'OFF'}",
               f"-DFUSED_TRAIN_WITH_CUDA={'ON' if args.cuda else 'OFF'}"]
        if ninja:
            cmd += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if run(cmd) != 0:
            sys.exit("run_ctest.py: CMake configure failed")
    if run([cmake, "--build", build_dir, "-j", jobs]) != 0:
        sys.exit("run_ctest.py: build failed")
    built = time.monotonic()

    # ctest's own output streams through; its summary line is repeated last, with the times.
    proc = subprocess.Popen([ctest, "--output-on-failure", *args.ctest_args], cwd=build_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary = "ctest printed no summary"
    for line in proc.stdout:
        print(line, end="", flush=True)
        if re.search(r"\d+% tests passed", line) or line.startswith("No tests were found"):
            summary = line.strip()
    rc = proc.wait()
    done = time.monotonic()
    print(f"run_ctest.py: {summary} (build {built - started:.0f} s, tests {done - built:.0f} s, {build_dir})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
