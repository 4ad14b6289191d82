"""Times candidate tile configs of the attention kernels on this GPU, against the table's entry
(fasttransformer/kernels/configs.py) in the same process, and writes the fastest per (kernel,
head dim, mask): what the table should hold.

    python benchmarks/tune_attention.py --out DIR [--kernels forward,dkdv,dq,jvp] [--head-dims 64,128]
        [--masks none,causal,decode,decode-gqa,verify-gqa,verify-gqa7] [--seqlen 4096] [--budget-s 480]

Masks none and causal time L x L attention; decode and decode-gqa time the forward of a
decoding step (one query per sequence against L keys, B = tokens / L sequences; decode-gqa with
4 query heads per key head, packed as the launcher packs them: 4 rows per program), in GB/s as
the attention benchmark counts them, over a grid with smaller query blocks (DECODE_GRID): a
decoding step has 1 or 4 live rows in its block. verify-gqa is a speculative decoding step's
verification (the benchmark's: 4 drafts per sequence, causal lower right, decode-gqa's heads),
launched as the launcher does: (draft, head) pairs packed as rows where gqa_row_packing packs
for the candidate's block_m, and compiled ahead of time as the packed kernel (PACK_GQA);
verify-gqa7 the same with 7 query heads per key head (Qwen2's group: 8 rows a draft, one
spare). The backward and JVP kernels are not timed for them.

1. Every candidate (a grid of BLOCK_M x BLOCK_N x warps x stages, plus the table's entry) is
   compiled ahead of time for this GPU's arch with every mask on (fasttransformer.kernels.aot, in
   a process pool). The table must hold for every mask, so a candidate that spills there is
   not timed.
2. The survivors are JIT-compiled by ``--warm-workers`` spawned processes (default 16 on CUDA),
   each running its share once on the GPU: Triton's on-disk cache then holds every kernel, and
   the timing loop spends no time compiling (a compile, ~1.2 s per kernel at the AOT check's rate,
   outlasts a timing: do_bench runs ~0.25 s).
3. Each survivor is timed with do_bench on bf16 inputs of B * L = 16k tokens and 2048 hidden.
   The forward is timed alone, and so is the JVP kernel (forward mode's tangent, from the
   forward's output). Each backward kernel is timed inside the whole backward, with the other
   kernel at its table entry, so the differences between candidates are the kernel's own.
   ``--budget-s`` is shared out between the (kernel, D, mask) cases (what one leaves, the next
   may use); a case's table entry is always timed, and candidates left when its share runs out
   are listed as not timed: one call of the device tool (10 minutes) always brings back what it
   measured, for every case.

Writes tune.json (every candidate: registers, stack, time, TFLOP/s; GB/s for decoding steps)
and tune.md (per case: the table's entry, the fastest candidate, the speedup). On a machine
without a GPU, ``--device cpu`` runs the same steps under Triton's interpreter at toy sizes (the
tests use it; the times mean nothing there).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# The repository root: the GPU machine runs this from a checkout, with nothing installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = ("forward", "dkdv", "dq", "jvp")
GRID = {"block_m": (32, 64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (1, 2, 3)}
DECODE_GRID = {**GRID, "block_m": (16, 32, 64, 128)}
MASKS = ("none", "causal", "decode", "decode-gqa", "verify-gqa", "verify-gqa7")
DECODE_MASKS = ("decode", "decode-gqa", "verify-gqa", "verify-gqa7")
VERIFY_MASKS = ("verify-gqa", "verify-gqa7")  # the drafts, causal lower right, launched packed (PACK_GQA)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for tune.json and tune.md")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--masks", default="none,causal", help=f"among {', '.join(MASKS)}")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop timing after this many seconds")
    parser.add_argument("--candidates", default=None,
                        help="comma-separated MxNxWARPSxSTAGES (default: the grid of the module's GRID)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--arch", type=int, default=None, help="the AOT check's arch (default: this GPU's; 90 on cpu)")
    parser.add_argument("--skip-aot", action="store_true", help="time every candidate, spilling or not")
    parser.add_argument("--warm-workers", type=int, default=None,
                        help="processes that JIT-compile the candidates before the timing "
                             "(default: 16 on cuda, 0 on cpu)")
    args = parser.parse_args(argv)
    args.kernels = args.kernels.split(",")
    try:
        args.head_dims = [int(d) for d in args.head_dims.split(",")]
    except ValueError:
        parser.error(f"--head-dims must be comma-separated ints, got {args.head_dims!r}")
    args.masks = args.masks.split(",")
    for name, values, allowed in (("--kernels", args.kernels, KERNELS), ("--masks", args.masks, MASKS)):
        if not set(values) <= set(allowed):
            parser.error(f"{name} must be among {allowed}, got {values}")
    if "forward" not in args.kernels and set(args.masks) <= set(DECODE_MASKS):
        parser.error(f"--masks {','.join(args.masks)} times the forward only: --kernels must include forward")
    return args


def candidates(args, table_entry, mask):
    from fasttransformer.kernels.configs import Config
    if args.candidates:
        grid = [Config(*(int(x) for x in item.split("x"))) for item in args.candidates.split(",")]
    else:
        axes = (DECODE_GRID if mask in DECODE_MASKS else GRID).values()
        grid = [Config(*values) for values in itertools.product(*axes)]
    return [table_entry] + [config for config in grid if config != table_entry]


def aot_filter(jobs, processes):
    """(kernel, arch, D, config, packed) -> the AOT report, every mask on (packed: the GQA
    row-packed forward, PACK_GQA). Spawned workers, without
    TRITON_INTERPRET: the compile needs the real triton.jit, which a forked worker of an
    interpreted process would not have."""
    import multiprocessing

    from fasttransformer.kernels.aot import _compile_job
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            reports = list(pool.map(_compile_job, [
                (kernel, arch, d, tuple(config), {"PACK_GQA": True} if packed else {}, "bf16")
                for kernel, arch, d, config, packed in jobs]))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return dict(zip(jobs, reports))


def case_inputs(head_dim, mask, seqlen, tokens, hidden, device, dtype):
    """(q, k, v, grad, out, lse, kwargs) of one case: out/lse from the table's forward (a
    decoding step: q (B, H, 1, D), k and v (B, Hk, L, D), no grad)."""
    import torch

    from fasttransformer.bench.attention import GQA_MASKS, QWEN2_GROUP, SPECULATIVE_QUERIES, gqa_kv_heads
    from fasttransformer.kernels.attention_forward import attention_forward
    batch, heads = max(1, tokens // seqlen), max(1, hidden // head_dim)
    kv_heads = gqa_kv_heads(heads) if mask in GQA_MASKS else heads
    if mask == "verify-gqa7":  # the benchmark's: verify-gqa's key heads, 7 query heads each
        heads = QWEN2_GROUP * kv_heads
    seqlen_q = seqlen if mask not in DECODE_MASKS else (min(SPECULATIVE_QUERIES, seqlen) if mask in VERIFY_MASKS else 1)
    q = torch.randn(batch, heads, seqlen_q, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, seqlen, head_dim, device=device, dtype=dtype) for _ in range(2))
    grad = None if mask in DECODE_MASKS else torch.randn_like(q)  # dO; for the JVP kernel, the tangents' seed
    # verify-gqa: the drafts causal, lower right
    kwargs = {"causal_offset": 0 if mask == "causal" else seqlen - seqlen_q if mask in VERIFY_MASKS else None}
    out, lse = attention_forward(q, k, v, **kwargs)
    return q, k, v, grad, out, lse, kwargs


def candidate_call(kernel, config, inputs):
    """The call that times ``config`` of ``kernel``: the forward alone, the whole backward with
    the other kernel at its table entry, or the JVP kernel alone (forward mode's tangent)."""
    from fasttransformer.kernels.attention_backward import attention_backward
    from fasttransformer.kernels.attention_forward import attention_forward
    q, k, v, grad, out, lse, kwargs = inputs
    if kernel == "forward":
        return lambda: attention_forward(q, k, v, **kwargs, block_m=config.block_m, block_n=config.block_n,
                                         num_warps=config.num_warps, num_stages=config.num_stages)
    if kernel == "jvp":  # the tangent alone (forward mode), for tangents of Q, K and V
        import torch

        from fasttransformer.kernels.attention_jvp import attention_jvp
        tangents = (grad, torch.roll(k, 1, -1), torch.roll(v, 1, -1))
        return lambda: attention_jvp(q, k, v, out, lse, *tangents, **kwargs, config=config)
    return lambda: attention_backward(grad, q, k, v, out, lse, **kwargs, **{f"{kernel}_config": config})


def warm_job(job):
    """In a spawned worker: run each candidate of one case once (the JIT compiles it into Triton's
    on-disk cache, where the timing process finds it). Errors are left to the timing loop."""
    import torch

    from fasttransformer.kernels.configs import Config
    (kernel, head_dim, mask, configs), (seqlen, tokens, hidden, device, dtype_name) = job
    inputs = case_inputs(head_dim, mask, seqlen, tokens, hidden, device, getattr(torch, dtype_name))
    for config in configs:
        try:
            candidate_call(kernel, Config(*config), inputs)()
        except Exception:  # noqa: BLE001  (the timing loop records it)
            pass
    if device == "cuda":
        torch.cuda.synchronize()
    return len(configs)


def warm(lists, setting, processes, chunk=4):
    """Runs ``warm_job`` over every (case, chunk of candidates) in ``processes`` spawned workers."""
    import multiprocessing
    jobs = [((kernel, head_dim, mask, [tuple(config) for config in configs[start:start + chunk]]), setting)
            for (kernel, head_dim, mask), configs in lists.items() for start in range(0, len(configs), chunk)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(warm_job, jobs))


def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, kernel):
    """The forward's 2 products a visible pair; a backward kernel counted as the whole backward
    (2.5x); the JVP kernel's tangent as its 4 products (2x the forward)."""
    forward = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim / (2 if causal else 1)
    return {"forward": forward, "jvp": 2 * forward}.get(kernel, 2.5 * forward)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from fasttransformer._cli import output_folder
    from fasttransformer.bench import common
    from fasttransformer.bench.attention import bytes_moved
    from fasttransformer.kernels import configs
    output_folder(args.out, "--out")  # before the timing, not after it

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: pass --device cpu (toy sizes under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu needs TRITON_INTERPRET=1 set before triton is imported", file=sys.stderr)
        return 2
    from fasttransformer.kernels.aot import _FakeDevice
    arch = args.arch or (90 if args.device == "cpu" else configs._arch(torch.device("cuda")))
    table_device = _FakeDevice(arch)  # the table's entries for this arch, also on the CPU

    def table_entry(kernel, head_dim, mask):  # what a decoding step launches too (no entry of its own yet)
        causal = mask in ("causal", *VERIFY_MASKS)
        if kernel == "forward":  # verify-gqa(7): the packed entry (the same block_m)
            return configs.forward_config(table_device, torch.bfloat16, head_dim, causal, packed=mask in VERIFY_MASKS)
        if kernel == "jvp":
            return configs.jvp_config(table_device, torch.bfloat16, head_dim)
        dkdv, dq = configs.backward_configs(table_device, torch.bfloat16, head_dim, causal)
        return dkdv if kernel == "dkdv" else dq

    cases = [(kernel, d, mask) for kernel in args.kernels for d in args.head_dims for mask in args.masks
             if kernel == "forward" or mask not in DECODE_MASKS]
    lists = {case: candidates(args, table_entry(*case), case[2]) for case in cases}
    reports = {}
    if not args.skip_aot:
        jobs = sorted({(kernel, arch, d, config, mask in VERIFY_MASKS) for (kernel, d, mask), grid in lists.items()
                       for config in grid})
        started = time.time()
        reports = aot_filter(jobs, max(1, min(16, os.cpu_count() or 1)))
        print(f"compiled {len(jobs)} candidates for sm_{arch} in {time.time() - started:.0f} s", flush=True)

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float16  # the interpreter's dots: no bf16
    timed_lists = {case: [config for config in grid
                          if not reports.get((case[0], arch, case[1], config, case[2] in VERIFY_MASKS),
                                             {}).get("stack_bytes")]
                   for case, grid in lists.items()}
    workers = args.warm_workers if args.warm_workers is not None else (16 if args.device == "cuda" else 0)
    if workers:
        started = time.time()
        setting = (args.seqlen, args.tokens, args.hidden, args.device, str(dtype).replace("torch.", ""))
        count = warm(timed_lists, setting, workers)
        print(f"JIT-compiled {count} candidates in {workers} workers in {time.time() - started:.0f} s", flush=True)
    started, rows = time.time(), []
    for case_index, (kernel, head_dim, mask) in enumerate(cases):
        causal, decode = mask == "causal", mask in DECODE_MASKS
        deadline = started + (case_index + 1) * args.budget_s / len(cases)  # a share, plus what earlier cases left
        inputs = case_inputs(head_dim, mask, args.seqlen, args.tokens, args.hidden, args.device, dtype)
        shape = list(inputs[0].shape)
        flops = attention_flops(shape[0], shape[1], shape[2], args.seqlen, head_dim, causal, kernel)
        # decoding steps: bound by the bytes read (Q, K, V read, O written, as the benchmark counts them)
        moved = bytes_moved(shape[0], shape[1], args.seqlen, head_dim, inputs[0].element_size(), "fwd", shape[2],
                            inputs[1].shape[1])
        for index, config in enumerate(lists[(kernel, head_dim, mask)]):
            row = {"kernel": kernel, "head_dim": head_dim, "mask": mask, "config": list(config),
                   "table_entry": index == 0, "shape": shape}
            report = reports.get((kernel, arch, head_dim, config, mask in VERIFY_MASKS))
            if report is not None:
                row.update(registers=report["registers"], stack_bytes=report["stack_bytes"])
                if report["stack_bytes"]:
                    spilled = f"spills {report['stack_bytes']} bytes on sm_{arch} with every mask on"
                    rows.append({**row, "skipped": spilled})
                    continue
            if index > 0 and time.time() > deadline:
                rows.append({**row, "skipped": "not timed: its share of --budget-s ran out"})
                continue
            fn = candidate_call(kernel, config, inputs)
            try:
                ms = common.time_ms(fn, args.device)
            except Exception as error:  # a config the GPU refuses (shared memory, ...): recorded, not fatal
                rows.append({**row, "skipped": f"{type(error).__name__}: {str(error)[:200]}"})
                continue
            rows.append({**row, "ms": ms, "tflops": flops / ms / 1e9, **({"gbps": moved / ms / 1e6} if decode else {})})
            rate = f"{moved / ms / 1e6:7.1f} GB/s" if decode else f"{flops / ms / 1e9:7.1f} TFLOP/s"
            print(f"{kernel:8} D={head_dim:<4} {mask:10} {'x'.join(map(str, config)):12} {ms:8.3f} ms"
                  f" {rate}{'  (table)' if index == 0 else ''}", flush=True)

    record = {"environment": common.environment(args.device), "arch": arch, "dtype": str(dtype),
              "args": {key: value for key, value in vars(args).items() if key != "out"}, "results": rows}
    lines = ["| kernel | D | mask | table entry | ms | fastest | ms | speedup |", "|---|---|---|---|---|---|---|---|"]
    best = {}
    for kernel, head_dim, mask in cases:
        timed = [row for row in rows if (row["kernel"], row["head_dim"], row["mask"]) == (kernel, head_dim, mask)
                 and "ms" in row]
        entry = next((row for row in timed if row["table_entry"]), None)
        if not timed:
            lines.append(f"| {kernel} | {head_dim} | {mask} | n/a | | | | |")
            continue
        fastest = min(timed, key=lambda row: row["ms"])
        best[f"{kernel}/{head_dim}/{mask}"] = fastest["config"]
        entry_text = ("x".join(map(str, entry["config"])), f"{entry['ms']:.3f}") if entry else ("n/a (spills)", "")
        speedup = f"{entry['ms'] / fastest['ms']:.2f}x" if entry else ""
        lines.append(f"| {kernel} | {head_dim} | {mask} | {entry_text[0]} | {entry_text[1]} | "
                     f"{'x'.join(map(str, fastest['config']))} | {fastest['ms']:.3f} | {speedup} |")
    record["fastest"] = best
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "tune.json").write_text(json.dumps(record, indent=1) + "\n")
    Path(args.out, "tune.md").write_text(
        f"Config tuning on {record['environment']['device']} (sm_{arch}), {record['dtype']}, "
        f"L = {args.seqlen}, {args.tokens} tokens, {args.hidden} hidden. Configs: BLOCK_M x BLOCK_N x warps x "
        "stages; candidates that spill with every mask on are not timed.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
