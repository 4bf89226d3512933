"""The messages that replace cryptic install failures: a torch other than the one fused_train._C was built
against, a _C that fails to load, a build inside pip's isolated environment, an incomplete source tree.

The decisions are plain functions (fused_train/_torch_version_check.py) tested directly; setup.py's guards and
fused_train/__init__.py's wiring are run in a subprocess, without compiling anything.
"""

import importlib.machinery
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fused_train import _torch_version_check as check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REBUILD = "python -m pip install --no-build-isolation -e ."


@pytest.mark.parametrize(
    "built, running, same",
    [
        ("2.14.1+cu130", "2.14.1+cu130", True),
        ("2.14.0", "2.14.1+cu130", True),  # patch releases keep the ABI; the local tag is not compared
        ("2.14.1+cpu", "2.14.1+cu130", True),
        ("2.13.0+cpu", "2.14.1+cu130", False),
        ("3.0.0", "2.14.1", False),
        ("2.15.0.dev20261120+cpu", "2.15.0.dev20261121+cpu", False),  # nightlies: the whole version
        ("2.15.0a0+git1a2b3c", "2.15.0a0+git1a2b3c", True),
        ("2.15.0a0+git1a2b3c", "2.15.0", False),
    ],
)
def test_mismatch_decided_by_minor_release_or_whole_prerelease(built, running, same):
    message = check.torch_mismatch_message(built, running, REBUILD)
    if same:
        assert message is None
    else:
        assert f"built against torch {built}" in message
        assert f"torch {running} is running" in message
        assert REBUILD in message


def test_no_recorded_build_torch_leaves_the_decision_to_loading():
    assert check.torch_mismatch_message(None, torch.__version__, REBUILD) is None


@pytest.mark.parametrize("built", ["2.13.0", "2.14.1+cu130", None])
def test_load_failure_names_both_versions_the_reason_and_the_rebuild(built):
    message = check.load_failure_message(built, "2.14.1+cu130", "_C.so: undefined symbol: _ZN3c10", REBUILD)
    assert "undefined symbol: _ZN3c10" in message
    assert "torch 2.14.1+cu130" in message
    assert REBUILD in message
    if built is None:
        assert "unknown" in message
    else:
        assert f"built against torch {built}" in message


def test_load_error_reason_says_when_no_extension_was_built(tmp_path):
    error = ImportError("cannot import name '_C' from partially initialized module 'fused_train'")
    assert "no compiled _C module" in check.load_error_reason(error, str(tmp_path))
    (tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    error = ImportError("/x/_C.so: undefined symbol: _ZN3c10\nmore")
    assert check.load_error_reason(error, str(tmp_path)) == "/x/_C.so: undefined symbol: _ZN3c10"


def test_rebuild_command_in_place_for_a_source_tree_else_reinstall(tmp_path):
    package = tmp_path / "fused_train"
    package.mkdir()
    assert "--force-reinstall --no-deps" in check.rebuild_command(str(package), "/env/bin/python")
    (tmp_path / "setup.py").write_text("")
    command = check.rebuild_command(str(package), "/env/bin/python")
    assert command == f"cd {tmp_path} && /env/bin/python -m pip install --no-build-isolation -e ."


def test_import_with_another_build_torch_raises_importerror_naming_both():
    # fused_train/_built_against.py replaced in sys.modules before the package imports it.
    code = (
        "import sys, types\n"
        "m = types.ModuleType('fused_train._built_against'); m.TORCH_VERSION = '1.0.0'\n"
        "sys.modules[m.__name__] = m\n"
        "import fused_train\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 1
    message = result.stderr[result.stderr.rindex("ImportError"):]
    assert "ImportError: fused_train was built against torch 1.0.0" in message
    assert f"but torch {torch.__version__} is running" in message
    assert "--no-build-isolation" in message


# ----------------------------------------------------------------------------------------------------
# Build time
@pytest.mark.parametrize(
    "path, prefix, expected",
    [
        (["/usr/lib/python3.11", "/tmp/pip-build-env-ab12/overlay/lib/python3.11/site-packages"], "/venv",
         "pip"),
        (["/tmp/build-env-x1/lib/python3.11/site-packages"], "/tmp/build-env-x1", "python -m build"),
        (["/root/.cache/uv/builds-v0/.tmpQx/lib/python3.11/site-packages"],
         "/root/.cache/uv/builds-v0/.tmpQx", "uv"),
        (["/venv/lib/python3.11/site-packages"], "/venv", None),
        (["/work/pip-build-envy/lib"], "/work/my-build-env", None),
    ],
)
def test_isolated_build_env_detection(path, prefix, expected):
    found = check.isolated_build_env(path, prefix)
    if expected is None:
        assert found is None
    else:
        assert expected in found


def _fake_env(tmp_path, torch_version):
    """A prefix whose site-packages holds the metadata of one torch (nothing importable)."""
    import sysconfig

    site = sysconfig.get_paths(vars={"base": str(tmp_path), "platbase": str(tmp_path)})["purelib"]
    info = os.path.join(site, f"torch-{torch_version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    return site


def test_hidden_environment_torch_is_read_only_where_isolation_hid_it(tmp_path):
    site = _fake_env(tmp_path, "2.13.0")
    assert check.hidden_environment_torch(["/tmp/pip-build-env-x/overlay"], str(tmp_path)) == "2.13.0"
    # Its site-packages on sys.path: it is the build environment itself, not the user's.
    assert check.hidden_environment_torch([site], str(tmp_path)) is None


def test_build_isolation_message():
    assert check.build_isolation_message("pip's isolated build environment", "2.14.1", "2.14.1") is None
    message = check.build_isolation_message("pip's isolated build environment", "2.15.0", "2.14.1")
    assert "torch 2.15.0" in message and "torch 2.14.1" in message
    assert "--no-build-isolation" in message and "FUSED_TRAIN_ALLOW_BUILD_ISOLATION=1" in message
    assert "no torch" in check.build_isolation_message("uv's isolated build environment", None, None)


def _source_copy(folder):
    """What setup.py reads, copied into folder: setup.py runs there without touching the checkout (it writes
    fused_train/_built_against.py) and may be given an incomplete tree."""
    folder.mkdir(exist_ok=True)
    shutil.copy(os.path.join(ROOT, "setup.py"), folder)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), folder)
    shutil.copytree(os.path.join(ROOT, "fused_train"), folder / "fused_train",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_built_against.py"))
    shutil.copytree(os.path.join(ROOT, "csrc"), folder / "csrc")
    return folder


def _run_setup(cwd, extra_env, extra_path=None):
    """`python setup.py --name` in cwd: runs every check setup.py makes, compiles nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_TRAIN_")}
    env.update(extra_env)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "setup.py", "--name"], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_setup_py_stops_in_an_isolated_build_unless_allowed(tmp_path):
    source = _source_copy(tmp_path / "src")
    # A sys.path entry of pip's isolated environment, while this interpreter's own site-packages (and its
    # torch) stays visible: pip's marker, and no torch known to be the user's.
    fake = tmp_path / "pip-build-env-test" / "site"
    fake.mkdir(parents=True)
    stopped = _run_setup(source, {}, str(fake))
    assert stopped.returncode != 0
    assert "pip's isolated build environment" in stopped.stderr
    assert "--no-build-isolation" in stopped.stderr
    allow = {"FUSED_TRAIN_ALLOW_BUILD_ISOLATION": "1", "FUSED_TRAIN_FORCE_CPU": "1"}
    allowed = _run_setup(source, allow, str(fake))
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip().splitlines()[-1] == "fused_train"
    built_against = (source / "fused_train" / "_built_against.py").read_text()
    assert f"TORCH_VERSION = {torch.__version__!r}" in built_against


def test_setup_py_names_a_missing_source_group(tmp_path):
    # As an sdist without MANIFEST.in's files was: exit before compiling, naming what is missing.
    source = _source_copy(tmp_path)
    shutil.rmtree(source / "csrc" / "cpu" / "isa")
    result = _run_setup(source, {})
    assert result.returncode != 0
    assert "no file matches csrc/cpu/isa/kernels_" in result.stderr
    assert "incomplete" in result.stderr
