"""Builds fasttransformer._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Install into the environment that holds your torch, without build isolation (isolation would
build against a second, mismatched torch):  pip install --no-build-isolation .
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import setuptools
import torch
from setuptools import setup

# torch takes CUDA_HOME from nvcc's folder when it is not set: a wrapper script such as
# /usr/local/bin/nvcc (our CPU machines have one) makes it /usr/local, where no CUDA header is.
nvcc = shutil.which("nvcc")
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/include/cuda_runtime.h") and (
        nvcc is None or not os.path.exists(os.path.join(os.path.dirname(nvcc), "..", "include", "cuda_runtime.h"))):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension, CUDAExtension,  # noqa: E402
                                       get_cxx_compiler)


def openmp_flags(compiler):
    """(compile flags, link flags) with which `compiler` builds and links an OpenMP probe, else None.

    gcc and LLVM's clang take -fopenmp. Apple's clang rejects it ("unsupported option"), but torch's
    macOS wheels bring libomp.dylib and omp.h, and `-Xpreprocessor -fopenmp` against those shares
    torch's OpenMP runtime (a second copy aborts the process, OMP Error #15). MSVC (cl, and
    clang-cl, torch's compilers on Windows) takes /openmp, in its own command syntax, and links
    the runtime its omp.h names. The probe must see _OPENMP defined: a compiler that ignores an
    option it does not know, with a warning and exit status 0 (cl does), counts as failing.
    Without any, the CPU kernels build anyway and run on one thread (at::parallel_for is serial
    without _OPENMP). (Not tried on a real Windows machine: the tests use stand-ins.)
    """
    torch_dir = os.path.dirname(torch.__file__)
    # a path (on Windows C:\Program Files\...\cl.exe, which shlex would mangle), or words ("ccache g++")
    words = [compiler] if os.path.isfile(compiler) else shlex.split(compiler)
    program = os.path.basename(words[0]).lower() if words else ""
    msvc = program.removesuffix(".exe") in ("cl", "clang-cl")
    candidates = [(["/openmp"], [])] if msvc else [(["-fopenmp"], ["-fopenmp"])]
    if not msvc and sys.platform == "darwin" and os.path.exists(os.path.join(torch_dir, "lib", "libomp.dylib")):
        library = os.path.join(torch_dir, "lib")
        candidates.insert(0, (["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(torch_dir, "include")],
                              ["-L" + library, "-lomp", "-Wl,-rpath," + library]))
    with tempfile.TemporaryDirectory() as folder:  # an executable: its link must resolve the runtime
        probe = os.path.join(folder, "probe.cpp")
        with open(probe, "w") as file:
            file.write("#ifndef _OPENMP\n#error OpenMP is not enabled\n#endif\n#include <omp.h>\n"
                       "int main() {\n  int n = 0;\n#pragma omp parallel\n"
                       "  n = omp_get_num_threads();\n  return n > 0 ? 0 : 1;\n}\n")
        for compile_flags, link_flags in candidates:
            output = ["/nologo", "/Fe" + probe + ".exe", "/Fo" + probe + ".obj"] if msvc else ["-o", probe + ".out"]
            command = [*words, *compile_flags, probe, *output, *link_flags]
            try:
                if subprocess.run(command, capture_output=True).returncode == 0:
                    return compile_flags, link_flags
            except OSError:  # no such compiler: the build itself will say so
                return None
    return None


class BuildWithOpenMP(BuildExtension):
    """Adds the OpenMP flags this machine's compiler takes (FASTTRANSFORMER_OPENMP=0: none)."""

    def build_extensions(self):
        compiler = get_cxx_compiler()
        if os.environ.get("FASTTRANSFORMER_OPENMP") == "0":
            flags, reason = None, "FASTTRANSFORMER_OPENMP=0"
        else:
            flags, reason = openmp_flags(compiler), f"{compiler} could not compile and link an OpenMP probe"
        if flags is None:
            print(f"fasttransformer: building without OpenMP ({reason}): the CPU kernels will run on one "
                  "thread", file=sys.stderr)
        for extension in self.extensions:
            extension.extra_compile_args["cxx"] += flags[0] if flags else []
            extension.extra_link_args += flags[1] if flags else []
        super().build_extensions()


with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
if os.environ.get("FASTTRANSFORMER_FORCE_CPU") == "1":
    with_cuda = False
# By default sm_80 and sm_90 code, and sm_90's PTX, which the driver compiles for the GPUs after
# it (sm_100, sm_120: without it they find no kernel image); TORCH_CUDA_ARCH_LIST overrides.
cuda_archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX") if with_cuda else ""

sources = sorted(glob.glob("csrc/*.cpp"))
cxx_flags = ["-O3"]
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

if __name__ == "__main__":  # pip runs it so too; tests import openmp_flags without building
    setup(
        **LICENSE,
        ext_modules=[
            extension(
                "fasttransformer._C",
                sources,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            )
        ],
        cmdclass={"build_ext": BuildWithOpenMP},
    )
