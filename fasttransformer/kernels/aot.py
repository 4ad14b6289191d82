"""Ahead-of-time compilation of Triton kernels for a GPU that is not here.

``python -m fasttransformer.kernels.aot`` compiles every attention-forward config in
``FORWARD_CONFIGS`` (and the backward kernels at ``BACKWARD_CONFIG``) for sm_80 and sm_90 with ``triton.compile(..., target=GPUTarget(...))``
and prints, as JSON, what each cubin uses (registers, stack bytes from Triton's cuobjdump) and
which matrix instructions its PTX has (wgmma on sm_90, mma.sync on sm_80). It must run without
TRITON_INTERPRET (the interpreter replaces ``triton.jit``), so tests call it in a subprocess.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

MATRIX_INSTRUCTIONS = ("wgmma.mma_async", "mma.sync")

# Worst-case options (every mask kind on): what a config must survive without spilling.
WORST_CASE = {"CAUSAL": True, "WINDOW": True, "MASK_KIND": 1, "HAS_KEY_PADDING": True}
# (arch, head_dim) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Candidates only: chosen by a
# ptxas sweep on 2026-11-23 (no GPU timing yet); none is spill-free at D = 128 yet.
FORWARD_CONFIGS = {
    (80, 64): (64, 64, 8, 2), (80, 128): (64, 32, 8, 2),
    (90, 64): (128, 64, 8, 2), (90, 128): (128, 64, 8, 2),
}
# The backward's launcher default; not tuned yet. With every mask on, both backward kernels sit
# at 255 registers and spill even at 32 x 32 tiles (sweep of 2026-11-23), so the cause is the
# code, not the tile size: to be found before tuning.
BACKWARD_CONFIG = (64, 64, 4, 1)


def _signature(fn, dtype: str) -> dict:
    types = {}
    for name in inspect.signature(fn).parameters:
        if name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
            types[name] = f"*{dtype}"
        elif name in ("Lse", "Delta"):
            types[name] = "*fp32"
        elif name in ("Mask", "KeyPadding"):
            types[name] = "*u8"
        elif name in ("scale_log2", "scale"):
            types[name] = "fp32"
        elif name.isupper() or name.startswith("BLOCK"):
            types[name] = "constexpr"
        else:
            types[name] = "i32"
    return types


def compile_forward(arch: int, head_dim: int, config, dtype: str = "bf16", options=None) -> dict:
    from fasttransformer.kernels.attention_forward import attention_forward_kernel
    return compile_kernel(attention_forward_kernel, arch, head_dim, config, dtype, options)


def compile_kernel(kernel, arch: int, head_dim: int, config, dtype: str = "bf16", options=None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_m, block_n, num_warps, num_stages = config
    constants = {**WORST_CASE, **(options or {}), "DOT_PRECISION": "tf32",
                 "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}
    compiled = triton.compile(ASTSource(kernel, _signature(kernel.fn, dtype), constexprs=constants),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {
        "kernel": kernel.fn.__name__, "arch": arch, "head_dim": head_dim, "config": list(config),
        "registers": int(registers.group(1)) if registers else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "shared_bytes": compiled.metadata.shared,
        "matrix_instructions": [i for i in MATRIX_INSTRUCTIONS if i in compiled.asm["ptx"]],
    }


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    reports = [compile_forward(arch, head_dim, config) for (arch, head_dim), config in FORWARD_CONFIGS.items()]
    # Every other mask kind must compile too (the worst case above has them all on).
    for options in ({"CAUSAL": False, "WINDOW": False, "MASK_KIND": 0, "HAS_KEY_PADDING": False},
                    {"MASK_KIND": 2}, {"CAUSAL": False, "MASK_KIND": 0}):
        for arch in (80, 90):
            reports.append(compile_forward(arch, 64, FORWARD_CONFIGS[(arch, 64)], options=options))
            reports[-1]["options"] = options
    from fasttransformer.kernels.attention_backward import (attention_backward_dkdv_kernel,
                                                            attention_backward_dq_kernel)
    for kernel in (attention_backward_dkdv_kernel, attention_backward_dq_kernel):
        for arch in (80, 90):
            reports.append(compile_kernel(kernel, arch, 64, BACKWARD_CONFIG))
    print(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
