"""setup.py's OpenMP flags: taken from what this machine's compiler can build, so that a compiler that
rejects -fopenmp (Apple's clang) still builds the extension, with one-thread CPU kernels."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fasttransformer import _extension

ROOT = Path(__file__).resolve().parents[1]
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None or not sys.platform.startswith("linux"),
                               reason="the stand-in compilers wrap g++ on Linux")

# Rejects -fopenmp unless it follows -Xpreprocessor, as Apple's clang does; otherwise it is g++.
APPLE_CLANG = """#!/bin/sh
previous=""
for argument in "$@"; do
  if [ "$argument" = "-fopenmp" ] && [ "$previous" != "-Xpreprocessor" ]; then
    echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1
  fi
  previous="$argument"
done
exec g++ "$@"
"""


# Ignores the options it does not know with a warning and exits 0, as MSVC's cl does (D9002), takes
# /openmp, /Fe<exe>, /Fo<obj>, /nologo and -o (deprecated in cl, still taken); otherwise it is g++,
# linking the OpenMP runtime whatever the options, as cl links the one its omp.h names.
MSVC_CL = """#!/bin/sh
set --  "$@" --end
while [ "$1" != "--end" ]; do
  case "$1" in
    /openmp) set -- "$@" -fopenmp ;;
    /nologo|/Fo*) ;;
    /Fe*) set -- "$@" -o "${1#/Fe}" ;;
    -o) set -- "$@" -o "$2"; shift ;;
    -*) echo "cl : Command line warning D9002 : ignoring unknown option '$1'" >&2 ;;
    *) set -- "$@" "$1" ;;
  esac
  shift
done
shift
exec g++ "$@" -lgomp
"""

# A gcc-like compiler that drops -fopenmp (with a warning) and exits 0: no _OPENMP, no threads
# (the runtime is linked, so omp.h's functions resolve: only _OPENMP tells).
IGNORES_FOPENMP = """#!/bin/sh
for argument in "$@"; do
  shift
  if [ "$argument" = "-fopenmp" ]; then echo "warning: -fopenmp ignored" >&2; else set -- "$@" "$argument"; fi
done
exec g++ "$@" -lgomp
"""


def stand_in(folder, name, script):
    folder.mkdir(parents=True, exist_ok=True)
    compiler = folder / name
    compiler.write_text(script)
    compiler.chmod(0o755)
    return str(compiler)


@pytest.fixture
def apple_clang(tmp_path):
    compiler = tmp_path / "apple-clang++"
    compiler.write_text(APPLE_CLANG)
    compiler.chmod(0o755)
    return str(compiler)


def openmp_flags(compiler, platform=None, torch_dir=None):
    """setup.py's openmp_flags(compiler), run in a child process (setup.py sets environment variables
    at import), optionally as if on `platform` with torch installed in `torch_dir`."""
    code = textwrap.dedent(f"""
        import json, runpy, sys, torch
        namespace = runpy.run_path({str(ROOT / "setup.py")!r}, run_name="setup")
        if {platform!r}: sys.platform = {platform!r}
        if {torch_dir!r}: torch.__file__ = {torch_dir!r} + "/__init__.py"
        print(json.dumps(namespace["openmp_flags"]({compiler!r})))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@needs_gxx
def test_openmp_flags_of_gcc_are_fopenmp():
    assert openmp_flags("g++") == [["-fopenmp"], ["-fopenmp"]]
    assert _extension.build_info()["openmp"], "the suite's own build (g++) has no OpenMP"


@needs_gxx
def test_openmp_flags_none_where_the_compiler_rejects_fopenmp(apple_clang):
    assert openmp_flags(apple_clang) is None
    assert openmp_flags(apple_clang, platform="darwin") is None  # torch without its libomp.dylib


@needs_gxx
def test_openmp_flags_on_macos_use_the_libomp_torch_ships(apple_clang, tmp_path):
    """torch's macOS wheels carry lib/libomp.dylib (and omp.h): linking that one shares torch's OpenMP
    runtime. Here libomp is g++'s libgomp under that name, and g++ finds its own omp.h."""
    library = tmp_path / "torch" / "lib"
    library.mkdir(parents=True)
    (library / "libomp.dylib").touch()
    libgomp = subprocess.run(["g++", "-print-file-name=libgomp.so"], capture_output=True, text=True).stdout.strip()
    (library / "libomp.so").symlink_to(os.path.realpath(libgomp))
    torch_dir = str(tmp_path / "torch")
    assert openmp_flags(apple_clang, platform="darwin", torch_dir=torch_dir) == [
        ["-Xpreprocessor", "-fopenmp", f"-I{torch_dir}/include"],
        [f"-L{library}", "-lomp", f"-Wl,-rpath,{library}"]]
    # gcc on macOS (or an LLVM clang) would take -fopenmp too, but the probe tries torch's first
    assert openmp_flags("g++", platform="darwin", torch_dir=torch_dir)[0][0] == "-Xpreprocessor"


@needs_gxx
@pytest.mark.parametrize("folder, name", [("bin", "cl"), ("Program Files/MSVC", "cl.exe"), ("llvm", "clang-cl")])
def test_openmp_flags_of_msvc_are_slash_openmp(tmp_path, folder, name):
    """cl would take -fopenmp with a warning and build the probe without OpenMP: its flag is /openmp,
    and the compiler may be a path with spaces (how Windows installs it)."""
    compiler = stand_in(tmp_path / folder, name, MSVC_CL)
    assert openmp_flags(compiler) == [["/openmp"], []]


@needs_gxx
def test_openmp_flags_none_where_the_compiler_ignores_fopenmp(tmp_path):
    """Exit status 0 is not enough: the probe needs _OPENMP defined (cl's way with unknown options,
    seen from a gcc-like compiler)."""
    assert openmp_flags(stand_in(tmp_path, "ignoring-c++", IGNORES_FOPENMP)) is None
    assert openmp_flags(stand_in(tmp_path, "cc-wrapper", MSVC_CL)) is None  # not named cl: given -fopenmp
    assert openmp_flags(str(tmp_path / "no-such-compiler")) is None


@needs_gxx
@pytest.mark.slow
def test_extension_builds_without_openmp_where_the_compiler_rejects_it(apple_clang, tmp_path):
    """The whole build with the stand-in for Apple's clang: it says it goes without OpenMP, and the
    extension it makes runs, on one thread, giving the suite's build's numbers bit for bit."""
    environment = {**os.environ, "CXX": apple_clang, "LDSHARED": f"{apple_clang} -shared",
                   "FASTTRANSFORMER_FORCE_CPU": "1"}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "temp")],
                           capture_output=True, text=True, cwd=ROOT, env=environment)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    assert "building without OpenMP" in build.stderr
    package = tmp_path / "package"
    shutil.copytree(ROOT / "fasttransformer", package / "fasttransformer",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    for built in (tmp_path / "lib" / "fasttransformer").glob("_C*.so"):
        shutil.copy(built, package / "fasttransformer")

    ids, weight = torch.randint(0, 97, (3, 41)), torch.randn(97, 24)
    torch.save((ids, weight), tmp_path / "inputs.pt")
    code = textwrap.dedent(f"""
        import torch
        from fasttransformer import _extension
        from fasttransformer.ops import token_positional_embedding
        assert _extension.build_info() == dict(built=True, cpu_kernels=True, cuda_kernels=False,
                                               openmp=False, cuda_archs=None), _extension.build_info()
        ids, weight = torch.load({str(tmp_path / "inputs.pt")!r})
        torch.save(token_positional_embedding(ids, weight, scale=1.5, padding_idx=0),
                   {str(tmp_path / "output.pt")!r})
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=package)
    assert run.returncode == 0, run.stderr[-3000:]
    from fasttransformer.ops import token_positional_embedding
    expected = token_positional_embedding(ids, weight, scale=1.5, padding_idx=0)
    assert torch.equal(torch.load(tmp_path / "output.pt"), expected)
