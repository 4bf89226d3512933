"""The torch that fused_train._C is compiled against must be the torch that loads it.

libtorch has no stable C++ ABI: an extension compiled against one torch fails to load into another (an
undefined-symbol error) or, worse, loads and misbehaves. Two checks turn that into a message that says what
to do:

- at build time (setup.py loads this file by path): stop a build inside an isolated PEP 517 environment
  (``pip install .`` without ``--no-build-isolation``), whose torch is whatever pip put there, not the
  user's;
- at import time (``fused_train/__init__.py``): compare the torch the build recorded in ``_built_against.py``
  with the running one, and explain a failed load of ``_C`` instead of passing the dynamic loader's error on.

Standard library only: setup.py runs this before torch is importable.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys
import sysconfig

ALLOW_ISOLATION_VAR = "FUSED_TRAIN_ALLOW_BUILD_ISOLATION"
_RELEASE = re.compile(r"(\d+)\.(\d+)(?:\.\d+)*")


def abi_key(version: str) -> tuple[int, int] | str:
    """What two torch versions must share for an extension built against one to load into the other.

    A release is identified by major.minor: torch keeps its C++ ABI within a minor series (patch releases are
    bug fixes, and prebuilt extension wheels such as flash-attn's are published per minor release). A
    pre-release, nightly or source build (``2.15.0.dev20261120``, ``2.15.0a0+git1a2b3c``) changes its ABI from
    one build to the next, so there the whole version must match. The local tag (``+cpu``, ``+cu130``) is not
    compared: a CPU-only build loads into a CUDA torch of the same release, and the reverse fails to load,
    which :func:`load_failure_message` explains.
    """
    public = version.split("+", 1)[0]
    match = _RELEASE.fullmatch(public)
    if match is None:
        return version
    return int(match.group(1)), int(match.group(2))


def rebuild_command(package_dir: str, python: str = sys.executable) -> str:
    """The command that rebuilds fused_train against the torch ``python`` imports.

    From a source checkout (setup.py beside the package: an editable install or a run from the tree) it
    rebuilds in place; otherwise the installed copy is replaced from the source folder or sdist.
    """
    source = os.path.dirname(os.path.abspath(package_dir))
    if os.path.isfile(os.path.join(source, "setup.py")):
        return f"cd {source} && {python} -m pip install --no-build-isolation -e ."
    return (
        f"{python} -m pip install --no-build-isolation --force-reinstall --no-deps .   "
        "(in the fused_train source folder; or name the sdist instead of .)"
    )


def torch_mismatch_message(built: str | None, running: str, rebuild: str) -> str | None:
    """The ImportError message when _C was built against a torch whose ABI differs from the running one.

    None when they match, or when the build torch is unknown (a build that recorded nothing): then loading
    _C decides, and :func:`load_failure_message` explains a failure.
    """
    if built is None or abi_key(built) == abi_key(running):
        return None
    return (
        f"fused_train was built against torch {built}, but torch {running} is running. Its compiled kernels "
        f"(fused_train._C) only load into the torch release they were compiled against. Rebuild fused_train "
        f"against this torch:\n    {rebuild}\nor install the torch it was built against ({built})."
    )


def load_error_reason(error: BaseException, package_dir: str) -> str:
    """One line saying why importing _C failed. Where no _C was built at all, Python's own message blames
    a circular import, so say that instead."""
    if not any(os.path.isfile(os.path.join(package_dir, "_C" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return f"{package_dir} holds no compiled _C module (it was never built there)"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_failure_message(built: str | None, running: str, reason: str, rebuild: str) -> str:
    """The ImportError message when loading _C failed (undefined symbol, missing library, not built)."""
    if built is None:
        versions = f"The torch it was built against is unknown; torch {running} is running."
    elif built == running:
        versions = (
            f"It was built against torch {built}, the torch running now, so the cause is likely elsewhere (a "
            "missing CUDA or C++ runtime library?); rebuilding is still the first thing to try."
        )
    else:
        versions = f"It was built against torch {built}, but torch {running} is running."
    return (
        f"fused_train's compiled kernels (fused_train._C) failed to load: {reason}\n"
        f"{versions} Rebuild fused_train against this torch:\n    {rebuild}"
    )


# ----------------------------------------------------------------------------------------------------
# Build time
def isolated_build_env(path: list[str], prefix: str) -> str | None:
    """Which isolated PEP 517 build environment this process runs in (from ``sys.path`` and ``sys.prefix``).

    Each frontend installs the build requirements (torch among them) into a fresh folder: pip into
    ``pip-build-env-*`` folders put on ``sys.path`` in front of a hidden environment, ``python -m build``
    into a ``build-env-*`` virtualenv, uv into a virtualenv under its cache's ``builds-v0`` bucket.
    Returns None outside of those (``--no-build-isolation``, ``python -m build --no-isolation``).
    """
    for entry in path:
        if any(part.startswith("pip-build-env-") for part in entry.split(os.sep)):
            return "pip's isolated build environment"
    parts = os.path.normpath(prefix).split(os.sep)
    if parts and parts[-1].startswith("build-env-"):
        return "the isolated environment of `python -m build`"
    if "builds-v0" in parts:
        return "uv's isolated build environment"
    return None


def hidden_environment_torch(path: list[str], prefix: str) -> str | None:
    """The torch version installed in the environment an isolated build hides, or None.

    pip keeps ``sys.prefix`` at the environment ``pip install`` runs for and only takes its site-packages off
    ``sys.path``: that environment's torch is the one fused_train will be imported with. Read from its
    metadata, without importing it. None where the prefix's site-packages is on ``sys.path`` (it is then the
    isolated environment itself) or holds no torch.
    """
    from importlib import metadata

    paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
    site_dirs = {paths["purelib"], paths["platlib"]}
    visible = {os.path.normpath(entry) for entry in path}
    hidden = [d for d in site_dirs if os.path.normpath(d) not in visible and os.path.isdir(d)]
    for dist in metadata.distributions(path=hidden):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


def build_isolation_message(env: str, build_torch: str | None, user_torch: str | None) -> str | None:
    """The message that stops a build in an isolated environment, or None where the build may go on.

    It goes on when the environment pip installs into holds the very torch the isolated one does: then the
    extension is compiled against the torch it will run with.
    """
    if build_torch is not None and user_torch == build_torch:
        return None
    found = f"torch {build_torch}" if build_torch else "no torch"
    yours = f" (torch {user_torch} in the environment being installed into)" if user_torch else ""
    return (
        f"setup.py: this build runs in {env}, which holds {found}; fused_train must be compiled against the "
        f"torch it will be imported with{yours}: its kernels only load into the torch release they were "
        "compiled against. Install torch and the build tools into your environment, then build without "
        "isolation:\n"
        "    pip install torch ninja setuptools wheel\n"
        "    pip install --no-build-isolation .          (or -e . ; python -m build --no-isolation)\n"
        "To build in isolation anyway, against the torch that environment holds, set "
        f"{ALLOW_ISOLATION_VAR}=1."
    )
