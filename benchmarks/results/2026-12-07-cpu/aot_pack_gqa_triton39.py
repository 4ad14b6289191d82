"""Stop 37: the GQA row-packed forward's AOT jobs (PACK_GQA: the worst-case masks with 32- and
64-bit offsets and with split keys, and the merge's packed stores, every entry of the table,
sm_80/86/90, bf16 and fp32, and the (D, Dv) pairs) and the block-list classifier at every tile
size (the packed lists' rows among them), compiled under the Triton on PYTHONPATH (CI's record
is Triton 3.6's), listing those that spill or pass the arch's shared memory. Writes every
report as JSON.

    env -u TRITON_INTERPRET PYTHONPATH=.venv/triton-newest:. .venv/bin/python \\
        benchmarks/results/2026-12-07-cpu/aot_pack_gqa_triton39.py OUT.json
"""
import sys

from aot_jvp_triton39 import compile_jobs

from fasttransformer.kernels import aot

if __name__ == "__main__":
    compile_jobs([job for job in aot._jobs() if job[4].get("PACK_GQA") or job[0] == "classes"], sys.argv[1])
