"""Build fused_train's sdist and wheel from a clean copy of the repository, install each into a fresh venv,
and check that it imports and computes what torch does.

    .venv/bin/python tools/check_dist.py                 # the sources of HEAD (CI)
    .venv/bin/python tools/check_dist.py --worktree      # tracked and untracked-but-not-ignored files

Stages, each timed:
  1. copy:  `git archive HEAD` (or the worktree's files) into a temporary folder, so build products and other
            untracked files of the checkout cannot leak into the distributions;
  2. build: `python -m build --no-isolation` with the Python running this script: the sdist, then the wheel
            built from the unpacked sdist (so the sdist alone must be enough to compile);
  3. check: the sdist holds every tracked file but .ci/ and .gitignore, the wheel the compiled _C and the
            torch version it was built against;
  4. venv:  a fresh venv from the same base Python that takes torch (and ninja, setuptools) from the Python
            running this script by path: a line in a .pth file, so that interpreter's own .pth files are not
            run and nothing of the checkout reaches the venv; a second copy of torch would cost 6 GB of disk,
            which CI machines do not always have. fused_train's runtime dependencies are left out (--no-deps):
            importing and stepping need none;
  5. sdist: `pip install --no-build-isolation --no-deps` of the sdist into it (compiles again), then the
            smoke test: import, one fused_train.optim.AdamW step and one fused_train.nn.CrossEntropyLoss
            forward and backward on a tiny model, compared with torch's (left out with --torch, whose venvs
            each install the sdist fresh);
  6. wheel: `pip install --force-reinstall --no-deps` of the wheel (no compiler involved), then the smoke
            test;
  7. each --torch VERSION[:cuda]: a venv of its own with that torch, the sdist installed into it (CPU kernels
            only; with `:cuda` the CUDA kernels too, FUSED_TRAIN_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST=9.0
            unless set), the smoke test, then `pytest -m smoke` over the sdist's own tests/ (run from outside
            the sources, so the installed package is the one tested). One such venv exists at a time (each
            holds a CUDA build of torch, about 5 GB, and pip keeps no cache of it): the first is made beside
            stage 2, each next one once the one before is checked and deleted.

    .venv/bin/python tools/check_dist.py --torch 2.5.1 --torch 2.11.0:cuda   # what `make test` runs

FUSED_TRAIN_* build knobs, MAX_JOBS and TORCH_CUDA_ARCH_LIST pass through to both builds:
FUSED_TRAIN_FORCE_CPU=1 keeps them to the CPU kernels. Exits non-zero at the first failing stage.
"""

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tracked files an sdist does not need: CI wiring and git's own.
NOT_IN_SDIST = (".ci/", ".gitignore")

# Runs inside the fresh venv, from a folder without a fused_train/ in it.
SMOKE_TEST = r"""
import copy, sys
import torch
import fused_train

assert fused_train.__file__.startswith(sys.prefix), f"imported {fused_train.__file__}, not the venv's copy"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
reference = copy.deepcopy(model)
x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))

loss = fused_train.nn.CrossEntropyLoss(label_smoothing=0.1)(model(x), y)
expected = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(reference(x), y)
loss.backward()
expected.backward()
torch.testing.assert_close(loss, expected)
for p, q in zip(model.parameters(), reference.parameters()):
    torch.testing.assert_close(p.grad, q.grad)

optimizer = fused_train.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
optimizer.step()
torch_optimizer.step()
for p, q in zip(model.parameters(), reference.parameters()):
    torch.testing.assert_close(p, q)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(optimizer.state[p][key], torch_optimizer.state[q][key])
info = fused_train.build_info()
print(f"smoke test passed: loss {loss.item():.6f} (torch {expected.item():.6f}), AdamW step matches; "
      f"built against torch {info['torch_version']}, CUDA kernels {info['cuda_archs'] or 'none'}, "
      f"CPU kernels {info['cpu_capability']}")
"""


def shown(command):
    """A command as printed: a multi-line -c script is named, not echoed."""
    return " ".join("<script>" if "\n" in arg else arg for arg in command)


class Stages:
    """Runs commands stage by stage and prints how long each took."""

    def __init__(self):
        self.start = time.monotonic()
        self.times = []

    def run(self, name, *commands, cwd=None, env=None):
        print(f"\n== {name}", flush=True)
        began = time.monotonic()
        for command in commands:
            if callable(command):
                command()
                continue
            print("+ " + shown(command), flush=True)
            status = subprocess.run(command, check=False, cwd=cwd, env=env).returncode
            if status != 0:
                sys.exit(f"check_dist: stage '{name}' failed (exit status {status}): {shown(command)}")
        self.record(name, time.monotonic() - began)

    def record(self, name, seconds, note=""):
        self.times.append((name, seconds, note))
        print(f"-- {name}: {seconds:.1f} s{note}", flush=True)

    def summary(self):
        print("\ncheck_dist: all stages passed")
        for name, seconds, note in self.times:
            print(f"  {name:<56} {seconds:7.1f} s{note}")
        print(f"  {'total (wall clock)':<56} {time.monotonic() - self.start:7.1f} s")


class InBackground:
    """Commands run one after another in a thread, their output into a log printed if one fails."""

    def __init__(self, commands, log):
        self.commands, self.log, self.failed = commands, log, None
        self.began = time.monotonic()
        self.seconds = None
        self.process, self.stopped = None, False
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        with open(self.log, "w") as log:
            for command in self.commands:
                if self.stopped:
                    break
                log.write("+ " + shown(command) + "\n")
                log.flush()
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                status = self.process.wait()
                if status != 0:
                    self.failed = f"exit status {status}: {shown(command)}"
                    break
        self.seconds = time.monotonic() - self.began

    def stop(self):
        """Ends the running command (when an earlier stage failed) and waits for the thread."""
        self.stopped = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
        self.thread.join()

    def join(self, stages, name):
        print(f"\n== {name}", flush=True)
        waited = time.monotonic()
        self.thread.join()
        waited = time.monotonic() - waited
        with open(self.log) as log:
            print(log.read(), end="")
        if self.failed:
            sys.exit(f"check_dist: stage '{name}' failed ({self.failed})")
        stages.record(name, self.seconds, f" (in the background; waited {waited:.1f} s for it)")


def git(*args):
    return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True, text=True).stdout


def copy_sources(dest, worktree):
    """HEAD through git archive, or the worktree's tracked and untracked-but-not-ignored files. Returns the
    list of tracked files the copy holds."""
    if worktree:
        files = [f for f in git("ls-files", "-co", "--exclude-standard", "-z").split("\0") if f]
        files = [f for f in files if os.path.exists(os.path.join(ROOT, f))]
        for name in files:
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))
        return files
    if git("status", "--porcelain", "--untracked-files=no").strip():
        print("check_dist: note: uncommitted changes are not checked (HEAD is; --worktree checks them)")
    archive = subprocess.Popen(["git", "-C", ROOT, "archive", "--format=tar", "HEAD"], stdout=subprocess.PIPE)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(dest, **safe)
    if archive.wait() != 0:
        sys.exit("check_dist: git archive HEAD failed")
    return [f for f in git("ls-tree", "-r", "--name-only", "-z", "HEAD").split("\0") if f]


def check_contents(dist, tracked):
    """The sdist holds every tracked file it should, the wheel the compiled _C; returns their paths."""
    sdist = next(os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".tar.gz"))
    wheel = next(os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl"))
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [f for f in tracked if not f.startswith(NOT_IN_SDIST) and f not in in_sdist]
    if missing:
        sys.exit("check_dist: the sdist lacks tracked files (add them to MANIFEST.in):\n  "
                 + "\n  ".join(missing))
    if "fused_train/_built_against.py" in in_sdist:
        sys.exit("check_dist: the sdist holds fused_train/_built_against.py (each build writes its own)")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    if not any(n.startswith("fused_train/_C") and n.endswith(".so") for n in names):
        sys.exit(f"check_dist: the wheel holds no compiled fused_train/_C*.so: {names}")
    if "fused_train/_built_against.py" not in names:
        sys.exit("check_dist: the wheel lacks fused_train/_built_against.py")
    print(f"sdist: {len(in_sdist)} entries, every tracked file but {', '.join(NOT_IN_SDIST)}; "
          f"wheel: {len(names)} files with the compiled _C")
    return {"sdist": sdist, "wheel": wheel}


# What `pytest -m smoke` needs beside torch: the package's runtime dependencies and the test tools.
TEST_REQUIREMENTS = ["numpy", "tqdm", "scikit-learn", "pytest", "pytest-benchmark", "hypothesis", "ninja",
                     "setuptools", "wheel"]


class TorchLeg:
    """One extra torch version: its venv (made in the background), the sdist built and tested in it."""

    def __init__(self, spec, work):
        version, _, kind = spec.partition(":")
        if not version or kind not in ("", "cuda"):
            sys.exit(f"check_dist: --torch expects VERSION or VERSION:cuda, got {spec!r}")
        self.version, self.cuda = version, kind == "cuda"
        self.work = work
        self.venv = os.path.join(work, f"venv-torch-{version}")
        self.python = os.path.join(self.venv, "bin", "python")
        self.maker = None

    def start(self):
        """Makes the venv in the background. No pip cache: on a fresh CI machine it saves nothing and costs
        as much disk again as the install."""
        print(f"check_dist: making the venv with torch=={self.version} in the background "
              f"({free_disk(self.work)} free)", flush=True)
        self.maker = InBackground(
            [[sys.executable, "-m", "venv", self.venv],
             [self.python, "-m", "pip", "install", "--quiet", "--no-cache-dir", f"torch=={self.version}",
              *TEST_REQUIREMENTS]],
            os.path.join(self.work, f"venv-torch-{self.version}.log"),
        )

    def remove(self):
        shutil.rmtree(self.venv, ignore_errors=True)

    def build_env(self):
        env = dict(os.environ)
        env.pop("FUSED_TRAIN_FORCE_CPU" if self.cuda else "FUSED_TRAIN_FORCE_CUDA", None)
        if self.cuda:
            env["FUSED_TRAIN_FORCE_CUDA"] = "1"
            env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        else:
            env["FUSED_TRAIN_FORCE_CPU"] = "1"
        return env

    def check(self, stages, sdist, sdist_tree, run_dir):
        self.maker.join(stages, f"venv with torch=={self.version}")
        kernels = f"CPU + CUDA {self.build_env()['TORCH_CUDA_ARCH_LIST']}" if self.cuda else "CPU"
        stages.run(f"torch {self.version}: install the sdist ({kernels} kernels) + smoke test",
                   [self.python, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", sdist],
                   [self.python, "-W", "ignore::UserWarning", "-c", SMOKE_TEST], cwd=run_dir, env=self.build_env())
        stages.run(f"torch {self.version}: pytest -m smoke (the sdist's tests)",
                   [self.python, "-m", "pytest", "-q", "-m", "smoke", "-p", "no:cacheprovider",
                    os.path.join(sdist_tree, "tests")], cwd=run_dir)


def free_disk(path):
    return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB"


def share_site_packages(venv):
    """Puts this Python's site-packages on the sys.path of venv (made from the same base Python) as plain
    entries of a .pth file: torch and the build tools become importable without a second copy, and this
    Python's own .pth files (setuptools' hooks, any editable install) are not run, since only a site dir's
    .pth files are."""
    here = sysconfig.get_paths()
    there = sysconfig.get_paths(vars={"base": venv, "platbase": venv})
    with open(os.path.join(there["purelib"], "zz-shared-from-build-python.pth"), "w") as pth:
        pth.write("".join(f"{p}\n" for p in dict.fromkeys([here["purelib"], here["platlib"]])))


def unpack_sdist(sdist, dest):
    """The sdist's files under dest; returns the folder holding its pyproject.toml."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, **safe)
    (top,) = os.listdir(dest)
    return os.path.join(dest, top)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worktree", action="store_true",
                        help="check the worktree's files (tracked + untracked, not ignored) instead of HEAD")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder and print its path (the --torch venvs are deleted as each "
                             "is checked)")
    parser.add_argument("--torch", action="append", default=[], metavar="VERSION[:cuda]",
                        help="also install the sdist into a venv with this torch and run pytest -m smoke there "
                             "(:cuda compiles the CUDA kernels too); repeatable")
    args = parser.parse_args()

    python = sys.executable
    torch_version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('torch'))"],
        check=False, capture_output=True, text=True,
    ).stdout.strip()
    build_missing = subprocess.run([python, "-c", "import build"], check=False,
                                   capture_output=True).returncode
    if not torch_version or build_missing:
        sys.exit(f"check_dist: {python} needs torch and pypa/build: "
                 f"`{python} -m pip install torch build ninja`")

    work = tempfile.mkdtemp(prefix="fused-train-check-dist-")
    src, dist, venv, run_dir = (os.path.join(work, d) for d in ("src", "dist", "venv", "run"))
    for folder in (src, run_dir):
        os.makedirs(folder)
    venv_python = os.path.join(venv, "bin", "python")
    smoke = [venv_python, "-W", "ignore::UserWarning", "-c", SMOKE_TEST]
    stages = Stages()
    files = {}
    legs = []
    try:
        stages.run("copy sources (" + ("worktree" if args.worktree else "git archive HEAD") + ")",
                   lambda: files.update(tracked=copy_sources(src, args.worktree)))
        legs = [TorchLeg(spec, work) for spec in args.torch]
        if legs:
            legs[0].start()
        stages.run("python -m build --no-isolation (sdist, wheel from sdist)",
                   [python, "-m", "build", "--no-isolation", "--outdir", dist, src])
        stages.run("check sdist and wheel contents",
                   lambda: files.update(check_contents(dist, files["tracked"])))
        stages.run(f"fresh venv (torch {torch_version} of the build Python, by path)",
                   [python, "-m", "venv", venv],
                   lambda: share_site_packages(venv),
                   [venv_python, "-c", "import torch; assert torch.__version__.split('+')[0] == "
                    f"{torch_version.split('+')[0]!r}, torch.__version__"])
        if not legs:  # else each --torch venv installs the sdist fresh: a third CPU compile here adds nothing
            stages.run("install the sdist (--no-build-isolation) + smoke test",
                       [venv_python, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
                        files["sdist"]],
                       smoke, cwd=run_dir)
        stages.run("install the wheel + smoke test",
                   [venv_python, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps",
                    files["wheel"]],
                   smoke, cwd=run_dir)
        sdist_tree = unpack_sdist(files["sdist"], os.path.join(work, "sdist-tree")) if legs else None
        for i, leg in enumerate(legs):
            leg.check(stages, files["sdist"], sdist_tree, run_dir)
            leg.remove()
            if i + 1 < len(legs):
                legs[i + 1].start()
        stages.summary()
    finally:
        for leg in legs:
            if leg.maker is not None:
                leg.maker.stop()
        if args.keep:
            print(f"check_dist: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
