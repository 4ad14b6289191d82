"""What every benchmark shares: timing, machine ceilings, the environment record, JSON output.

Timing (../shared/GPU.md): CUDA with ``triton.testing.do_bench`` (median, after warm-up); CPU
with ``torch.utils.benchmark.Timer`` (median of blocked runs). Baselines run in the same process
on the same inputs; ratios are what carries across machines.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as torch_benchmark

from fasttransformer.ops import autotune


def time_ms(fn, device: str) -> float:
    """Median time of ``fn()`` in milliseconds."""
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()  # warm-up
    # Timer runs on one thread unless told otherwise: use the threads torch would use.
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=1.0)
    return measurement.median * 1e3


def ceilings(device: str) -> dict:
    """Measured device-to-device copy bandwidth (bytes read + written) and matmul rate."""
    if device == "cuda":
        numel, matmul_n, matmul_dtype = 2**29, 8192, torch.bfloat16  # 1 GiB of bf16
    else:
        numel, matmul_n, matmul_dtype = 2**26, 2048, torch.float32
    src = torch.randn(numel, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=matmul_dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=matmul_dtype)
    matmul_ms = time_ms(lambda: a @ b, device)
    del src, dst, a, b
    return {
        "copy_gbps": 2 * numel * (2 if device == "cuda" else 4) / copy_ms / 1e6,
        "matmul_tflops": 2 * matmul_n**3 / matmul_ms / 1e9,
        "matmul_dtype": str(matmul_dtype).replace("torch.", ""),
    }


def command_line(argv) -> str:
    """The command that reproduces this run, as a user would type it: ``python -m fasttransformer
    ...`` for the CLI (run as ``-m``, whose argv[0] is the path of ``__main__.py``, or as the
    installed ``fasttransformer`` script), otherwise ``python`` and argv with paths inside the
    checkout made relative to it (results files are committed: no one's home directory in them)."""
    program, args = (argv[0] if argv else ""), list(argv[1:])
    path = Path(program)
    if path.name == "fasttransformer" or path.parts[-2:] == ("fasttransformer", "__main__.py"):
        return shlex.join(["python", "-m", "fasttransformer", *args])
    root = Path(__file__).resolve().parents[2]

    def relative(arg: str) -> str:
        try:
            return str(Path(arg).resolve().relative_to(root)) if os.path.isabs(arg) else arg
        except ValueError:
            return arg
    return shlex.join(["python", *([relative(program)] if program else []), *args])


def environment(device: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "autotune": autotune.describe()["enabled"],  # FASTTRANSFORMER_AUTOTUNE: tuned configs, not the table's
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def write_results(out_dir: str, name: str, record: dict, markdown: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    Path(out_dir, f"{name}.md").write_text(markdown)
