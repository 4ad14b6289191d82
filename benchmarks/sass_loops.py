"""Instructions per loop iteration of the attention kernels, read from their compiled SASS (no GPU).

    python benchmarks/sass_loops.py --out benchmarks/results/<date>-cpu/sass-loops.json

Compiles the forward, dK/dV and dQ kernels ahead of time (``fasttransformer.kernels.aot``: the
table's config for the arch, bf16, the runtime specialisation of contiguous inputs) with no mask,
causal, and key padding (the tile lists), and the forward with split keys; disassembles each
cubin with the cuobjdump Triton ships, and counts the instructions of every loop: from a
backward branch's target to the branch (an outer loop's count includes its inner loops). A
static figure, not a timing: it shows what a change to a kernel's loop body does to the work
per tile before a GPU times it.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

CASES = {"none": {}, "causal": {"CAUSAL": True}, "padding": {"HAS_KEY_PADDING": True, "SPARSE": True},
         "split": {"SPLIT_KEYS": True}}  # the forward's split keys (flash-decoding), no mask


def disassemble(kernel, arch, head_dim, config, options) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasttransformer.kernels import aot
    from fasttransformer.kernels.configs import head_dim_bucket

    signature = aot._signature(kernel.fn, "bf16")
    ones, attrs = aot._runtime_specialisation(kernel, signature)
    constants = {**aot.NO_MASK, **options, **ones, "DOT_PRECISION": "tf32", "BLOCK_M": config[0],
                 "BLOCK_N": config[1], "BLOCK_D": head_dim_bucket(head_dim)}
    constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
    for name in constants:
        signature[name] = "constexpr"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config[2], "num_stages": config[3],
                                       "enable_fp_fusion": True})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout


def loops(sass: str):
    """(instructions in all, [(loop size, its 8 most frequent opcodes)]) in program order."""
    lines = [(int(match.group(1), 16), match.group(2)) for match in
             (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if match]
    index = {address: position for position, (address, _) in enumerate(lines)}
    found = []
    for position, (address, instruction) in enumerate(lines):
        branch = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", instruction)
        if branch and int(branch.group(1), 16) < address and int(branch.group(1), 16) in index:
            body = [text for _, text in lines[index[int(branch.group(1), 16)]:position + 1]]
            opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for text in body)
            found.append({"instructions": len(body), "opcodes": dict(opcodes.most_common(8))})
    return len(lines), found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file (a Markdown table is written beside it)")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dims", default="64,128")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    import torch
    import triton

    from fasttransformer.kernels import aot, configs
    from fasttransformer.kernels.attention_backward import (attention_backward_dkdv_kernel,
                                                            attention_backward_dq_kernel)
    from fasttransformer.kernels.attention_forward import attention_forward_kernel

    device = aot._FakeDevice(args.arch)
    rows = []
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        dkdv, dq = configs.backward_configs(device, torch.bfloat16, head_dim, False)
        for name, kernel, config in (("forward", attention_forward_kernel,
                                      configs.forward_config(device, torch.bfloat16, head_dim, False)),
                                     ("dkdv", attention_backward_dkdv_kernel, dkdv),
                                     ("dq", attention_backward_dq_kernel, dq)):
            for case, options in CASES.items():
                if case == "split" and name != "forward":
                    continue
                total, found = loops(disassemble(kernel, args.arch, head_dim, config, options))
                rows.append({"kernel": name, "head_dim": head_dim, "config": list(config), "case": case,
                             "instructions": total, "loops": found})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    record = {"what": "SASS instructions per loop iteration (static)", "arch": args.arch, "dtype": "bf16",
              "triton": triton.__version__, "torch": torch.__version__, "commit": commit + ("+dirty" if dirty else ""),
              "command": "python benchmarks/sass_loops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        json.dump(record, file, indent=1)
    table = ["| kernel | D | config | case | instructions | loops (instructions each) |", "|---|---|---|---|---|---|"]
    for row in rows:
        sizes = ", ".join(str(loop["instructions"]) for loop in row["loops"])
        table.append(f"| {row['kernel']} | {row['head_dim']} | {tuple(row['config'])} | {row['case']} | "
                     f"{row['instructions']} | {sizes} |")
    markdown = (f"SASS loops, sm_{args.arch}, bf16 (triton {triton.__version__}, commit {record['commit']})\n\n"
                + "\n".join(table) + "\n")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as file:
        file.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
