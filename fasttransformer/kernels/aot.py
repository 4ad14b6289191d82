"""Ahead-of-time compilation of Triton kernels for a GPU that is not here.

``python -m fasttransformer.kernels.aot`` compiles every config of the table in configs.py
(forward, both backward kernels and the forward-mode JVP kernel) for sm_80, sm_86 and sm_90 with
``triton.compile(..., target=GPUTarget(...))`` and prints, as JSON, what each cubin uses
(registers, stack bytes from Triton's cuobjdump, shared memory) and which matrix instructions its
PTX has (wgmma on sm_90, mma.sync on sm_80 and sm_86). ``--arch 86 --target 120`` compiles one
arch's entries for another target (sm_89 and sm_120 take sm_86's). It must run without
TRITON_INTERPRET (the interpreter replaces ``triton.jit``), so tests call it in a subprocess.

``--record FILE`` writes the reports with ``record_key()``, a hash of everything they depend on
(this folder's sources, Triton's and Python's versions): the compile is deterministic, so while
the key is unchanged the record is what a compile would print. CI's check reads the committed
record (``make aot-record`` writes it) and recompiles a random ``--sample`` of its jobs, which
must give the same reports; after a change to the kernels or another Triton it compiles
everything.
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

# Worst-case options (every mask on): what a config must survive without spilling. Dropout's
# configs (configs.DROPOUT_OVERRIDES) are compiled with it on as well.
WORST_CASE = {"CAUSAL": True, "WINDOW": True, "MASK_KIND": 1, "HAS_KEY_PADDING": True, "SPARSE": True,
              "DROPOUT": False, "POSITIVE_SCALE": True, "SPLIT_KEYS": False, "INT64_OFFSETS": False,
              "MASK_TANGENT": False}
NO_MASK = {"CAUSAL": False, "WINDOW": False, "MASK_KIND": 0, "HAS_KEY_PADDING": False, "SPARSE": False,
           "DROPOUT": False, "POSITIVE_SCALE": True, "SPLIT_KEYS": False, "INT64_OFFSETS": False}
COMBINE_CONFIG = (16, 0, 4, 1)  # attention_forward.COMBINE_BLOCK_M rows, 4 warps


def _signature(fn, dtype: str) -> dict:
    types = {}
    for name in inspect.signature(fn).parameters:
        if name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "TQ", "TK", "TV", "TOut", "TMask"):
            types[name] = f"*{dtype}"
        elif name in ("Lse", "Delta", "Partial", "PartialLse"):
            types[name] = "*fp32"
        elif name in ("Mask", "KeyPadding", "Classes"):
            types[name] = "*u8"
        elif name in ("BlockCounts", "BlockIndex", "Counts", "Indices"):
            types[name] = "*i32"
        elif name == "DBias":
            types[name] = "*fp32"
        elif name == "Seed":
            types[name] = "*i64"
        elif name in ("scale_log2", "scale", "dropout_scale"):
            types[name] = "fp32"
        elif name.isupper() or name.startswith("BLOCK"):
            types[name] = "constexpr"
        else:
            types[name] = "i32"
    return types


# What the JIT specialises at runtime for contiguous (B, H, L, D) inputs with L and D multiples
# of 16, which the compile here must mirror (without it the report describes another kernel:
# unknown strides forbid vectorised loads, and 32 x 32 tiles spilled):
#  * an int argument equal to 1 becomes a constant: the innermost strides;
#  * pointers and ints divisible by 16 get the hint tt.divisibility=16.
RUNTIME_ONES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_mn", "stride_pn",
                "stride_pd", "stride_tqd", "stride_tkd", "stride_tvd", "stride_tod", "stride_tmn")
DIVISIBLE_INTS = ("seqlen_q", "seqlen_k", "head_dim", "head_dim_v")


def _runtime_specialisation(fn, signature: dict):
    """(constants, attrs) that the JIT would give a launch on typical inputs."""
    constants, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in RUNTIME_ONES:
            constants[name] = 1
        elif signature[name].startswith("*") or name in DIVISIBLE_INTS or (
                name.startswith("stride_") and name[7] not in "cif"):  # not the block lists' strides
            attrs[(index,)] = [["tt.divisibility", 16]]
    return constants, attrs


def compile_kernel(kernel, arch: int, head_dim, config, dtype: str = "bf16", options=None) -> dict:
    """``head_dim``: D, or a pair (D, Dv) for a value head dim unlike the query's."""
    import triton

    from fasttransformer.kernels.configs import head_dim_bucket
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_m, block_n, num_warps, num_stages = config
    head_dim, head_dim_v = head_dim if isinstance(head_dim, (tuple, list)) else (head_dim, head_dim)
    signature = _signature(kernel.fn, dtype)
    ones, attrs = _runtime_specialisation(kernel, signature)
    constants = {**WORST_CASE, **ones, "DOT_PRECISION": "tf32x3" if dtype == "fp32" else "tf32",
                 "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": head_dim_bucket(head_dim),
                 "BLOCK_DV": head_dim_bucket(head_dim_v), "DV_DIFFERS": head_dim_v != head_dim,
                 **(options or {})}  # options: a padded pair's tiles too
    constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
    for name in constants:
        signature[name] = "constexpr"
    if constants.get("SPLIT_KEYS"):  # the forward writes float32 partial results
        signature["Out"] = "*fp32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages,
                                       "enable_fp_fusion": True})  # as every launch asks
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {
        "kernel": kernel.fn.__name__, "triton": triton.__version__, "arch": arch, "head_dim": head_dim,
        "head_dim_v": head_dim_v, "config": list(config),
        "registers": int(registers.group(1)) if registers else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "shared_bytes": compiled.metadata.shared,
        "matrix_instructions": [i for i in MATRIX_INSTRUCTIONS if i in compiled.asm["ptx"]],
    }


# (D, Dv) pairs compiled besides the table's D = Dv entries, in every variant, with the tiles the
# launchers take (configs.tile_head_dims): DeepSeek's MLA and the Differential Transformer's
# Dv = 2 D. ``--value-head-dims all`` compiles every pair of buckets with their own tiles: what
# configs.PADDED_VALUE_HEAD_DIMS is read from.
VALUE_HEAD_DIMS = ((192, 128), (64, 128))
BUCKETS = (16, 32, 64, 128, 256)  # configs.head_dim_bucket's values
ALL_VALUE_HEAD_DIMS = tuple((d, dv) for d in BUCKETS for dv in BUCKETS if d != dv)


def _jobs(value_head_dims=VALUE_HEAD_DIMS, own_tiles: bool = False):
    """Every (kernel, arch, D, config, options, dtype) the table (configs.py) can launch: the
    worst-case mask options for each kernel, plus the maskless, float-mask and split-key
    forward, in bf16 and in float32; the same with dropout on, with dropout's configs; the dQ
    kernel with the boolean mask and with the float mask's gradient; the int64-offset variants
    (inputs of 2**31 elements or more, with their configs) of the worst-case and float-mask
    forward and of both backward kernels, in both dtypes, with and without dropout; the GQA
    row-packed forward (PACK_GQA, no dropout: worst case with 32- and 64-bit offsets, and with
    split keys); the backward's delta pre-pass and the split keys' merge (packed or not), with
    int64 offsets or not. Then the
    same attention kernels for each (D, Dv) pair of ``value_head_dims`` (D in the job: the pair;
    float32 only where both are within configs.MAX_FP32_HEAD_DIM), with the launchers' tiles, or
    each head dim's own with ``own_tiles`` (the padded kernels' options name their tiles)."""
    from fasttransformer.kernels import configs
    jobs = []
    for dtype in ("bf16", "fp32"):
        for (arch, head_dim) in (configs.FORWARD_FP32 if dtype == "fp32" else configs.FORWARD):
            jobs += _attention_jobs(arch, head_dim, dtype)
            block_m, _, num_warps = configs.delta_config(head_dim)
            for options in ({}, {"INT64_OFFSETS": True}):
                jobs.append(("delta", arch, head_dim, (block_m, 0, num_warps, 1), options, dtype))
                for packed in ({}, {"PACK_GQA": True}):
                    jobs.append(("combine", arch, head_dim, COMBINE_CONFIG, {**options, **packed}, dtype))
    for arch in sorted({arch for arch, _ in configs.FORWARD}):
        for pair in value_head_dims:
            for dtype in ("bf16", "fp32") if max(pair) <= configs.MAX_FP32_HEAD_DIM else ("bf16",):
                jobs += _attention_jobs(arch, tuple(pair), dtype, own_tiles)
    return jobs + _list_jobs(jobs)


SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}  # what a block may take, per arch
KERNEL_NAMES = {"attention_forward_kernel": "forward", "attention_backward_dkdv_kernel": "dkdv",
                "attention_backward_dq_kernel": "dq"}


def padded_value_head_dims(reports) -> set:
    """configs.PADDED_VALUE_HEAD_DIMS's keys from the ``--value-head-dims all`` reports (any
    number of Tritons'): the (kernel, "2-byte" or "fp32", arch, D's bucket, Dv's bucket,
    dropout, int64 offsets) of which a variant spills or passes the arch's shared memory."""
    from fasttransformer.kernels.configs import head_dim_bucket
    return {(KERNEL_NAMES[r["kernel"]], "fp32" if r["dtype"] == "fp32" else "2-byte", r["arch"],
             head_dim_bucket(r["head_dim"]), head_dim_bucket(r["head_dim_v"]), bool(r["options"].get("DROPOUT")),
             bool(r["options"].get("INT64_OFFSETS")))
            for r in reports if r["kernel"] in KERNEL_NAMES and r["head_dim_v"] != r["head_dim"]
            and (r["stack_bytes"] or r["shared_bytes"] > SHARED_MEMORY_LIMIT[r["arch"]])}


def _attention_jobs(arch: int, head_dim, dtype: str, own_tiles: bool = False) -> list:
    """The forward and backward jobs of one (arch, D or (D, Dv), dtype), in every variant."""
    import torch

    from fasttransformer.kernels import configs
    device, torch_dtype = _FakeDevice(arch), torch.float32 if dtype == "fp32" else torch.bfloat16
    dims = (head_dim[0], head_dim[1]) if isinstance(head_dim, tuple) else (head_dim, None)
    jobs = []
    for dropout in (False, True):
        for int64 in (False, True):
            extra = {**({"DROPOUT": True} if dropout else {}), **({"INT64_OFFSETS": True} if int64 else {})}

            def tiles(kernel):  # a (D, Dv) pair that the kernel pads to the larger's tiles: named in its options
                if dims[1] is None or own_tiles:
                    return {}
                padded = configs.tile_head_dims(kernel, device, torch_dtype, *dims, dropout, int64)
                own = (configs.head_dim_bucket(dims[0]), configs.head_dim_bucket(dims[1]))
                return {} if padded == own else {"BLOCK_D": padded[0], "BLOCK_DV": padded[1]}
            config = configs.forward_config(device, torch_dtype, dims[0], True, dropout, int64, head_dim_v=dims[1])
            forward_options = ({}, {"MASK_KIND": 2, "POSITIVE_SCALE": False})
            if not int64:
                forward_options += ({"SPLIT_KEYS": True},) + (() if dropout else (NO_MASK,))
            for options in forward_options:
                jobs.append(("forward", arch, head_dim, tuple(config), {**options, **extra, **tiles("forward")}, dtype))
            if not dropout:  # GQA row packing (attention_forward.gqa_row_packing), split keys or not, with its config
                packed = configs.forward_config(device, torch_dtype, dims[0], True, dropout, int64, head_dim_v=dims[1],
                                                packed=True)
                for options in ({"PACK_GQA": True},) + (() if int64 else ({"PACK_GQA": True, "SPLIT_KEYS": True},)):
                    jobs.append(("forward", arch, head_dim, tuple(packed), {**options, **extra, **tiles("forward")},
                                 dtype))
            dkdv, dq = configs.backward_configs(device, torch_dtype, dims[0], True, dropout, int64, head_dim_v=dims[1])
            jobs.append(("dkdv", arch, head_dim, tuple(dkdv), {**extra, **tiles("dkdv")}, dtype))
            for options in ({}, {"MASK_KIND": 2, "BIAS_GRAD": True}):  # bool mask, float mask and its grad
                jobs.append(("dq", arch, head_dim, tuple(dq), {**options, **extra, **tiles("dq")}, dtype))
            # the forward-mode (JVP) kernel, with the dQ kernel's tiles
            jvp = configs.jvp_config(device, torch_dtype, dims[0], int64, head_dim_v=dims[1], dropout=dropout)
            for options in ({}, {"MASK_KIND": 2, "MASK_TANGENT": True}):  # bool mask, float mask and its tangent
                jobs.append(("jvp", arch, head_dim, tuple(jvp), {**options, **extra, **tiles("dq")}, dtype))
    return jobs


def _list_jobs(attention_jobs):
    """The block-list builder's two kernels (block_lists.py) for every tile size the attention
    jobs' configs classify at, with key padding and bounds on and the boolean mask per query
    row, broadcast over the queries, or absent, and every coarsening factor the backward's
    pairs of configs need: one classification at the smaller tiles serves both; and the rows
    of a GQA row-packed forward's lists (its block's queries: block_m / group, at least 8)."""
    from fasttransformer.kernels.attention_forward import packed_list_rows
    from fasttransformer.kernels.block_lists import CLASS_COLUMNS, CLASS_ROWS, LIST_TILES

    def variant(options):  # what picks a kernel's config besides (arch, D, dtype)
        return tuple(sorted((key, value) for key, value in options.items() if key in ("DROPOUT", "INT64_OFFSETS")))

    by_key = {(arch, head_dim, dtype, variant(options)): config for name, arch, head_dim, config, options, dtype
              in attention_jobs if name == "dkdv"}
    tiles, factors = set(), set()
    for name, arch, head_dim, config, options, dtype in attention_jobs:
        if name in ("forward", "jvp"):  # lists at the kernel's own tiles
            tiles.add((arch, config[0], config[1]))
            factors.add((arch, 1, 1, False))
            if options.get("PACK_GQA"):  # and a packed block's queries: block_m / group of them
                tiles.update((arch, rows, config[1]) for rows in packed_list_rows(config[0]))
        elif name == "dq":
            dkdv = by_key[(arch, head_dim, dtype, variant(options))]
            fine_m, fine_n = min(dkdv[0], config[0]), min(dkdv[1], config[1])
            tiles.add((arch, fine_m, fine_n))
            factors.add((arch, dkdv[1] // fine_n, dkdv[0] // fine_m, True))  # lists by key: transposed
            factors.add((arch, config[0] // fine_m, config[1] // fine_n, False))
    masks = ({"HAS_MASK": True, "MASK_ROWS": True}, {"HAS_MASK": True, "MASK_ROWS": False},  # and key padding
             {"HAS_MASK": False, "MASK_ROWS": False})
    jobs = [("classes", arch, 0, (block_m, block_n, 4, 1),
             {**mask, "TILES": max(1, CLASS_COLUMNS // block_n), "ROWS": CLASS_ROWS},
             "u8") for arch, block_m, block_n in sorted(tiles) for mask in masks]
    jobs += [("lists", arch, 0, (0, 0, 4, 1), {"FACTOR_R": factor_r, "FACTOR_C": factor_c, "TILES": LIST_TILES,
                                               "KEYS_ON_ROWS": by_key},
              "u8") for arch, factor_r, factor_c, by_key in sorted(factors)]
    return jobs


def record_key() -> str:
    """A hash of what the reports of a compile depend on: the sources in this folder (the
    kernels and their helpers, the config table, this job list and compile), Triton's version
    (its ptxas comes with it, unless TRITON_PTXAS_PATH names another) and Python's."""
    import hashlib

    import triton
    digest = hashlib.sha256()
    folder = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as source:
                digest.update(name.encode() + b"\0" + source.read() + b"\0")
    digest.update(f"triton {triton.__version__}, ptxas {os.environ.get('TRITON_PTXAS_PATH', 'its own')}, "
                  f"python {sys.version_info[0]}.{sys.version_info[1]}".encode())
    return digest.hexdigest()


def report_identity(report) -> tuple:
    """What a report was compiled from: its kernel, arch, head dims, config, options and dtype."""
    return (report["kernel"], report["arch"], report["head_dim"], report["head_dim_v"], tuple(report["config"]),
            json.dumps(report["options"], sort_keys=True), report["dtype"])


class _FakeDevice:
    """What configs.py reads of a CUDA device, for an arch that is not here."""
    type = "cuda"

    def __init__(self, arch):
        self.arch = arch


def _compile_job(job) -> dict:
    from fasttransformer.kernels.attention_backward import (attention_backward_dkdv_kernel,
                                                            attention_backward_dq_kernel, attention_delta_kernel)
    from fasttransformer.kernels.attention_forward import attention_combine_kernel, attention_forward_kernel
    from fasttransformer.kernels.attention_jvp import attention_jvp_kernel
    from fasttransformer.kernels.block_lists import block_lists_kernel, tile_classes_kernel
    kernels = {"forward": attention_forward_kernel, "dkdv": attention_backward_dkdv_kernel,
               "dq": attention_backward_dq_kernel, "jvp": attention_jvp_kernel, "delta": attention_delta_kernel,
               "combine": attention_combine_kernel,
               "classes": tile_classes_kernel, "lists": block_lists_kernel}
    name, arch, head_dim, config, options, dtype = job
    report = compile_kernel(kernels[name], arch, head_dim, config, dtype=dtype, options=options)
    report["options"], report["dtype"] = options, dtype
    return report


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m fasttransformer.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, help="only the table's entries for this arch (80, 86 or 90)")
    parser.add_argument("--target", type=int, help="compile them for this sm instead (with --arch; e.g. 89, 120)")
    parser.add_argument("--value-head-dims", choices=("all",),
                        help="all: every pair of unlike head-dim buckets (D, Dv), each with its own tiles (what "
                             "configs.PADDED_VALUE_HEAD_DIMS is read from), not only VALUE_HEAD_DIMS")
    parser.add_argument("--quick", action="store_true",
                        help="only sm_90's bf16 D = 128 entries, in every variant, and the first tile of the list "
                             "builder: each kernel's every code path once, in about a minute")
    parser.add_argument("--record", metavar="FILE",
                        help="also write the reports to FILE with record_key(), for CI's check (make aot-record): "
                             "every job, so none of the options that leave some out")
    parser.add_argument("--sample", type=int, metavar="N", help="only N jobs drawn at random (with --seed)")
    parser.add_argument("--seed", type=int, default=0, help="the draw of --sample (default 0)")
    args = parser.parse_args(argv)
    if args.target is not None and args.arch is None:
        parser.error("--target needs --arch")
    if args.record and (args.arch is not None or args.quick or args.value_head_dims or args.sample):
        parser.error("--record writes every job: not with --arch, --target, --quick, --value-head-dims or --sample")
    if args.sample is not None and (args.sample < 1 or args.quick):
        parser.error("--sample needs N >= 1, and not --quick")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    survey = args.value_head_dims == "all"
    jobs = [job for job in _jobs(ALL_VALUE_HEAD_DIMS if survey else VALUE_HEAD_DIMS, own_tiles=survey)
            if args.arch is None or job[1] == args.arch]
    if args.quick:
        lists = [job for job in jobs if job[0] in ("classes", "lists") and job[1] == 90]
        jobs = [job for job in jobs if job[1:3] == (90, 128) and job[5] == "bf16"]
        jobs += [job for job in lists if job[0] == "classes"][:3] + [job for job in lists if job[0] == "lists"][:1]
    if args.sample is not None:
        import random
        jobs = [jobs[index] for index in sorted(random.Random(args.seed).sample(range(len(jobs)),
                                                                                 min(args.sample, len(jobs))))]
    if args.target is not None:
        jobs = [(name, args.target, *rest) for name, _, *rest in jobs]
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        reports = list(pool.map(_compile_job, jobs))
    if args.record:
        import triton
        with open(args.record, "w") as record:  # one report a line: a change to the kernels diffs by line
            record.write(f'{{"key": "{record_key()}", "triton": "{triton.__version__}", '
                         f'"python": "{sys.version_info[0]}.{sys.version_info[1]}", "jobs": {len(reports)}, '
                         '"reports": [\n' + ",\n".join(json.dumps(report) for report in reports) + "\n]}\n")
    print(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
