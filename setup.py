"""Build fused_train._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and a
CUDA toolkit is found.

Knobs (see the README table):
  FUSED_TRAIN_FORCE_CPU=1   build the CPU kernels only, even where a toolkit is present
  FUSED_TRAIN_FORCE_CUDA=1  fail unless the CUDA kernels are built
  CUDA_HOME / CUDA_PATH     toolkit root (the folder holding lib64/libcudart.so); default /usr/local/cuda
  TORCH_CUDA_ARCH_LIST      e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPU, else DEFAULT_CUDA_ARCHS
  MAX_JOBS, NVCC_THREADS    parallel compile jobs; nvcc threads per job
  FUSED_TRAIN_ALLOW_BUILD_ISOLATION=1  build inside an isolated PEP 517 environment (pip install . without
                            --no-build-isolation) against whatever torch it holds; stopped by default
"""

import glob
import importlib.metadata
import importlib.util
import os
import platform
import sys

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

# Per-ISA builds of the CPU kernels, chosen at run time (csrc/cpu/cpu_dispatch.cpp). The flags match
# ATen's own AVX2/AVX512 builds, so at::vec picks the same code paths it does inside torch.
CPU_ISA_FLAGS = {
    "default": [],  # listed first: its copies of shared inline c10 functions win at link time
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    # GCC 12 reports its own _mm512_undefined_* idiom inside avx512fintrin.h as (maybe-)uninitialized
    # once inlined into at::vec (GCC bug 105593); silenced for this file only.
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
}


X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
if not X86:
    CPU_ISA_FLAGS = {"default": []}


def _sources(pattern):
    """Files matching pattern under ROOT, as ROOT-relative paths (setuptools wants relative sources), sorted.
    Exits when none match: a tree missing a source group (an sdist without MANIFEST.in's files) would
    otherwise build an extension that fails to load with an undefined symbol."""
    found = sorted(glob.glob(pattern, root_dir=ROOT, recursive=True))
    if not found:
        sys.exit(
            f"setup.py: no file matches {pattern} under {ROOT}: the source tree is incomplete. Build from a "
            "git checkout or from an sdist made by `python -m build --sdist` (MANIFEST.in lists its files)."
        )
    return found


# Every source group, checked before anything is compiled. The CUDA sources are checked even for a CPU-only
# build: an sdist must be able to build either.
cpp_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
isa_sources = {isa: _sources(f"csrc/cpu/isa/kernels_{isa}.cpp") for isa in CPU_ISA_FLAGS}
header_files = (
    _sources("csrc/include/fused_train/*.h") + _sources("csrc/*.h") + _sources("csrc/cpu/*.h")
    + _sources("csrc/cpu/kernel_table.inl") + _sources("csrc/cuda/*.cuh") + _sources("csrc/cuda/*.h")
)
cuda_sources = _sources("csrc/cuda/*.cu")


def _load_torch_version_check():
    """fused_train/_torch_version_check.py, loaded by path: importing the package would load _C."""
    spec = importlib.util.spec_from_file_location(
        "fused_train_torch_version_check", os.path.join(ROOT, "fused_train", "_torch_version_check.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(name):
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _find_cuda_home():
    """The toolkit root. The nvcc on PATH may be a wrapper script, so never guess from it alone."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    for nvcc in (os.environ.get("NVCC"), _which("nvcc")):
        if nvcc:
            candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "lib64", "libcudart.so")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            return root
    return None


def _which(program):
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


_cxx = os.environ.get("CXX", "c++")
if _which(_cxx.split()[0]) is None and not os.path.isfile(_cxx.split()[0]):
    sys.exit(
        f"setup.py: no C++ compiler found ({_cxx!r} is not on PATH). Install one (e.g. `apt-get install g++`) "
        "or point CXX at it."
    )

# An isolated build (pip install . without --no-build-isolation) compiles against the torch pip installed into
# a throwaway environment, which may not be the torch fused_train will be imported with: stop it here, before
# torch is imported, unless that environment's torch is the very one being installed into.
torch_version_check = _load_torch_version_check()
isolated_env = torch_version_check.isolated_build_env(sys.path, sys.prefix)
if isolated_env and not _flag(torch_version_check.ALLOW_ISOLATION_VAR):
    try:
        build_torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        build_torch = None
    user_torch = torch_version_check.hidden_environment_torch(sys.path, sys.prefix)
    message = torch_version_check.build_isolation_message(isolated_env, build_torch, user_torch)
    if message is not None:
        sys.exit(message)
    print(f"setup.py: building in {isolated_env} against torch {build_torch}, the torch of the environment "
          "it installs into.", file=sys.stderr)

# setuptools < 70.1 makes wheels, their metadata (dist_info) and PEP 660 editable installs through the
# separate `wheel` package; without it the build fails with "invalid command 'bdist_wheel'".
_setuptools_version = tuple(int(part) for part in setuptools.__version__.split(".")[:2] if part.isdigit())
if _setuptools_version < (70, 1) and {"bdist_wheel", "dist_info", "editable_wheel"} & set(sys.argv) and (
    importlib.util.find_spec("wheel") is None
):
    sys.exit(
        f"setup.py: setuptools {setuptools.__version__} builds wheels through the `wheel` package, which is "
        "not installed: `pip install wheel` (or `pip install -U setuptools`), then build again."
    )

force_cpu = _flag("FUSED_TRAIN_FORCE_CPU")
force_cuda = _flag("FUSED_TRAIN_FORCE_CUDA")
if force_cpu and force_cuda:
    sys.exit("setup.py: FUSED_TRAIN_FORCE_CPU=1 and FUSED_TRAIN_FORCE_CUDA=1 contradict each other")

cuda_home = None if force_cpu else _find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, on import.
    os.environ["CUDA_HOME"] = cuda_home

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "setup.py: torch is not importable. fused_train compiles against the installed torch: "
        "`pip install torch ninja pybind11` first, then `pip install --no-build-isolation .`"
    )

build_cuda = bool(cuda_home) and torch.version.cuda is not None and not force_cpu
if force_cuda and not build_cuda:
    why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit was found"
    sys.exit(
        f"setup.py: FUSED_TRAIN_FORCE_CUDA=1 but {why}. Set CUDA_HOME to the toolkit root "
        "(the folder holding lib64/libcudart.so)."
    )
if not build_cuda and not force_cpu:
    why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit was found"
    print(f"setup.py: building the CPU kernels only ({why}).", file=sys.stderr)

if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if torch.cuda.is_available():  # only picks the default architecture; never gates the build
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build_cuda else ""

include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
define_macros = [
    ("FUSED_TRAIN_WITH_CUDA", "1" if build_cuda else "0"),
    ("FUSED_TRAIN_CUDA_ARCHS", '"' + cuda_archs + '"'),
    ("FUSED_TRAIN_X86_ISAS", "1" if X86 else "0"),
    ("FUSED_TRAIN_TORCH_VERSION", '"' + torch.__version__ + '"'),
]
# torch's headers as system headers: their warnings (unknown CUDA pragmas, GCC 12's maybe-uninitialized
# false positives inside AVX-512 intrinsics) are not ours to fix, and must not hide ours.
from torch.utils.cpp_extension import include_paths as _torch_include_paths  # noqa: E402

system_includes = [flag for path in _torch_include_paths() for flag in ("-isystem", path)]
# -ffp-contract=off / --fmad=false: no silent a*b+c fusion, so the scalar, AVX2, AVX-512 and CUDA builds of
# one update round identically (centered RMSprop's v - g_avg^2 cancels, and a fused vs unfused rounding
# there is unbounded in relative terms). The kernels are memory-bound: measured no slower.
cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"] + system_includes
nvcc_flags = system_includes + [
    "-O3",
    "-lineinfo",
    "--fmad=false",
    "--expt-relaxed-constexpr",
    "-Xcompiler=-fopenmp",

]
if os.environ.get("NVCC_THREADS"):
    nvcc_flags.append(f"--threads={os.environ['NVCC_THREADS']}")

sources = cpp_sources + (cuda_sources if build_cuda else [])
# The per-ISA kernel files (isa_sources) are compiled by FusedTrainBuild below, each with its own flags.

# The torch this build compiles against, for fused_train/__init__.py to compare with the torch that imports
# it (an ImportError naming both instead of an undefined symbol). Generated, not tracked by git; rewritten
# only when it changes, so an unchanged tree stays unchanged.
BUILT_AGAINST = os.path.join(ROOT, "fused_train", "_built_against.py")
_built_against = (
    "# Written by setup.py: the torch fused_train._C was compiled against (not tracked by git).\n"
    f"TORCH_VERSION = {torch.__version__!r}\n"
)
try:
    with open(BUILT_AGAINST) as f:
        _recorded = f.read()
except FileNotFoundError:
    _recorded = None
if _recorded != _built_against:
    with open(BUILT_AGAINST, "w") as f:
        f.write(_built_against)


class FusedTrainBuild(BuildExtension):
    """BuildExtension plus one extra compile of each per-ISA source with its ISA flags."""

    def build_extension(self, ext):
        objects = []
        for isa, flags in CPU_ISA_FLAGS.items():
            out_dir = os.path.join(self.build_temp, "isa", isa)
            objects += self.compiler.compile(
                isa_sources[isa],
                output_dir=out_dir,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs + self.compiler.include_dirs,
                # ext.extra_compile_args by now holds BuildExtension's ABI and module-name flags too.
                extra_postargs={"cxx": ext.extra_compile_args["cxx"] + flags + [f"-DCPU_CAPABILITY={isa.upper()}"]},
                depends=ext.depends,
            )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


# -lstdc++ named before the compiler driver's own: torch already has the shared libstdc++ loaded, and ours
# must be that same one. Some toolchains link it statically (g++ wrappers that add -static-libstdc++, as on
# the project's GPU machines); a second, static copy inside _C then shares the process's locale data with the
# shared one and breaks iostreams, so every message built with std::ostringstream (TORCH_CHECK's included)
# came out truncated or segfaulted (2026-11-27, H100 machine). With the shared library first on the line, the
# static archive has nothing left to supply.
LINK_ARGS = ["-fopenmp", "-lstdc++"]

extension_cls = CUDAExtension if build_cuda else CppExtension
ext_kwargs = {}
if build_cuda:
    ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
else:
    ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}

ext_modules = [
    extension_cls(
        name="fused_train._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=LINK_ARGS,
        depends=header_files,
        py_limited_api=False,
        **ext_kwargs,
    )
]

# The license is given here, not in pyproject.toml (`dynamic = ["license"]`): setuptools < 77 (a fresh
# Python 3.11 venv has 65.5) rejects the SPDX string `license = "BSD-3-Clause"`, and setuptools >= 77
# deprecates the table form `{text = ...}` (an error from 2027-02-18). Both accept this, without a warning.
if _setuptools_version >= (77, 0):
    license_kwargs = {"license_expression": "BSD-3-Clause"}
else:
    license_kwargs = {"license": "BSD-3-Clause"}

setup(
    **license_kwargs,
    ext_modules=ext_modules,
    cmdclass={"build_ext": FusedTrainBuild.with_options(use_ninja=True)},
)
