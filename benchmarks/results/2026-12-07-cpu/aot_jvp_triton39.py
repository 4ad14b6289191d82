"""Stop 36: every AOT job of the JVP kernel (240: bool mask, float mask with its tangent, 32- and
64-bit offsets, with dropout or not, every entry and (D, Dv) pair, sm_80/86/90, bf16 and fp32)
compiled under the Triton on PYTHONPATH (CI's record is Triton 3.6's), listing those that spill
or pass the arch's shared memory. Writes every report as JSON.

    env -u TRITON_INTERPRET PYTHONPATH=.venv/triton-newest:. .venv/bin/python \\
        benchmarks/results/2026-12-07-cpu/aot_jvp_triton39.py OUT.json
"""
import json
import sys
from concurrent.futures import ProcessPoolExecutor

import triton

from fasttransformer.kernels import aot

def compile_jobs(jobs, out):
    """Compiles ``jobs`` (aot._jobs' tuples) on 2 processes, prints those that spill or pass the
    arch's shared memory, and writes every report to ``out`` (stop 37's aot_pack_gqa_triton39.py
    uses it too)."""
    with ProcessPoolExecutor(2) as pool:
        reports = list(pool.map(aot._compile_job, jobs))
    bad = [r for r in reports if r["stack_bytes"] or r["shared_bytes"] > aot.SHARED_MEMORY_LIMIT[r["arch"]]]
    print("triton", triton.__version__, "jobs", len(reports), "spill/overflow", len(bad))
    for r in bad:
        print(r["kernel"], r["arch"], r["head_dim"], r["head_dim_v"], r["config"], r["options"], r["dtype"],
              r["registers"], r["stack_bytes"])
    json.dump(reports, open(out, "w"), indent=0)


if __name__ == "__main__":
    compile_jobs([job for job in aot._jobs() if job[0] == "jvp"], sys.argv[1])
