"""How the extension was linked: against the shared libstdc++ that torch uses, so that messages built with
iostreams inside _C come out whole. A toolchain that links libstdc++ statically (a g++ wrapper adding
-static-libstdc++, as on the project's GPU machines) gave truncated build facts and error messages, or a
segfault, until setup.py put -lstdc++ first on the link line."""

import os
import platform
import re
import shutil
import subprocess

import pytest
import torch

import fused_train


def test_build_info_is_complete():
    info = fused_train.build_info()
    assert info["torch_version"], info
    assert info["cpu_capability"] in ("default", "avx2", "avx512"), info
    assert info["cuda_compiled"] == bool(info["cuda_archs"]), info


def _linux_release():
    if platform.system() != "Linux":
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or _linux_release() < (5, 2),
                    reason="no /proc/cpuinfo, or a Linux before 5.2 (which does not name avx512_bf16)")
def test_bf16_dot_product_is_what_the_kernel_reports():
    """build_info's cpu_bf16_dot_product (our CPUID read) against the flags Linux reports for the CPU."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    expected = all(f in flags for f in ("avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq"))
    assert fused_train.build_info()["cpu_bf16_dot_product"] == expected


def test_error_messages_come_out_whole():
    # Formatted by c10::str (an std::ostringstream) inside _C: integers after text are what broke.
    with pytest.raises(IndexError, match=r"target 9 at position 3 .* < 5 or target == ignore_index \(-100\)"):
        fused_train.nn.functional.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 9]))


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_extension_needs_the_shared_libstdcxx():
    dynamic = subprocess.run(["readelf", "-d", fused_train._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "libstdc++.so" in dynamic, f"{fused_train._C.__file__} does not load the shared libstdc++:\n{dynamic}"
