"""The CUDA sources build for sm_80 and sm_90 on a machine without a GPU (nvcc only), with no
register spill and no stack frame in any kernel; the CUDA glue type-checks against torch."""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME, include_paths

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
CUDA_INCLUDE = next((path for path in [
    Path(CUDA_HOME or "/nonexistent") / "include", Path("/usr/local/cuda/include"),
    *([Path(NVCC).resolve().parents[1] / "include"] if NVCC else []),
] if (path / "cuda_runtime.h").exists()), None)
CU_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
GLUE_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")


def ptxas_report(text):
    """{(kernel, arch): (stack_frame, spill_stores, spill_loads)} from `ptxas -v` output."""
    report, kernel, arch = {}, None, None
    for line in text.splitlines():
        if match := re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line):
            kernel, arch = match.groups()
        elif match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if kernel is not None:
                report[(kernel, arch)] = tuple(int(v) for v in match.groups())
                kernel = None
    return report


def test_ptxas_report_parser():
    text = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z1kv\n"
            "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n")
    assert ptxas_report(text) == {("_Z1kv", "sm_90"): (8, 4, 4)}


def test_default_build_carries_ptx_for_the_gpus_after_sm90(monkeypatch):
    """setup.py's default arch list gives sm_80 and sm_90 code and sm_90's PTX: an extension
    with machine code only would find no kernel image on sm_100 (B200) or sm_120 (RTX 50xx)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    default = re.search(r'setdefault\("TORCH_CUDA_ARCH_LIST", "([^"]+)"\)', (ROOT / "setup.py").read_text()).group(1)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", default)
    flags = set(_get_cuda_arch_flags())
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"} <= flags, flags


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_without_spills(source, arch, tmp_path):
    # The flags torch's extension build adds (they forbid implicit half conversions) and ours.
    command = [NVCC, "-std=c++17", "-O3", "-DWITH_CUDA", *COMMON_NVCC_FLAGS,
               f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-Xptxas", "-v", "-c", str(source), "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    report = ptxas_report(result.stderr + result.stdout)
    assert report, "ptxas reported no kernels"
    offenders = {kernel: usage for kernel, usage in report.items() if any(usage)}
    assert not offenders, f"stack frame / spills (bytes: frame, stores, loads): {offenders}"


@pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA headers not found")
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("source", GLUE_SOURCES, ids=lambda p: p.name)
def test_cuda_glue_type_checks_against_torch_headers(source, tmp_path):
    # The CPU build of torch ships the c10/cuda headers but not one file CMake generates for
    # CUDA builds; a one-line stand-in lets the glue be type-checked here. It is compiled for
    # real on the GPU machine (make gpu-check).
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [tmp_path, *include_paths(), CUDA_INCLUDE, sysconfig.get_paths()["include"]]
    # C++20, as torch.utils.cpp_extension compiles the real build since torch 2.13: torch 2.14's
    # headers use requires-clauses, which C++17 rejects.
    command = ["g++", "-std=c++20", "-fsyntax-only", "-DWITH_CUDA", "-w",
               *[f"-I{path}" for path in includes], str(source)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
