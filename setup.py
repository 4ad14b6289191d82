"""Builds fasttransformer._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Install into the environment that holds your torch, without build isolation (isolation would
build against a second, mismatched torch):  pip install --no-build-isolation .
"""
import glob
import os
import shutil

import setuptools
import torch
from setuptools import setup

# torch takes CUDA_HOME from nvcc's folder when it is not set: a wrapper script such as
# /usr/local/bin/nvcc (our CPU machines have one) makes it /usr/local, where no CUDA header is.
nvcc = shutil.which("nvcc")
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/include/cuda_runtime.h") and (
        nvcc is None or not os.path.exists(os.path.join(os.path.dirname(nvcc), "..", "include", "cuda_runtime.h"))):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
if os.environ.get("FASTTRANSFORMER_FORCE_CPU") == "1":
    with_cuda = False
# By default sm_80 and sm_90 code, and sm_90's PTX, which the driver compiles for the GPUs after
# it (sm_100, sm_120: without it they find no kernel image); TORCH_CUDA_ARCH_LIST overrides.
cuda_archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX") if with_cuda else ""

sources = sorted(glob.glob("csrc/*.cpp"))
cxx_flags = ["-O3", "-fopenmp"]
if cuda_archs:  # shell-safe (no quotes, no ';'): module.cpp turns it into a string
    cxx_flags.append("-DFT_CUDA_ARCHS=" + cuda_archs.replace(";", ",").replace(" ", ","))
extension = CppExtension
nvcc_flags = []
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    cxx_flags.append("-DWITH_CUDA")
    nvcc_flags = ["-O3", "-DWITH_CUDA", "-Xptxas=-warn-spills", "-Xptxas=-warn-lmem-usage"]
    extension = CUDAExtension

# pyproject.toml's license, as the installed setuptools takes it: an SPDX expression from 77 on, the
# older License text field before (a pyproject.toml with the SPDX string fails to build there)
LICENSE = ({"license_expression": "Apache-2.0"} if int(setuptools.__version__.split(".")[0]) >= 77
           else {"license": "Apache-2.0"})

setup(
    **LICENSE,
    ext_modules=[
        extension(
            "fasttransformer._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
