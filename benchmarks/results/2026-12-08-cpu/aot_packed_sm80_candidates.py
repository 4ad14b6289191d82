"""Stop 38: configs with the table's block_m (128) for the packed forward at sm_80, bf16, D = 128
(PACK_GQA, split keys or not), compiled under the Triton on PYTHONPATH: registers, stack bytes,
shared memory. The table's (128, 32, 8, 2) spilled 16 bytes under Triton 3.9.0 once spare rows came.

    env -u TRITON_INTERPRET .venv/bin/python benchmarks/results/2026-12-08-cpu/aot_packed_sm80_candidates.py
    env -u TRITON_INTERPRET PYTHONPATH=.venv/triton-newest:. .venv/bin/python \\
        benchmarks/results/2026-12-08-cpu/aot_packed_sm80_candidates.py
"""
from concurrent.futures import ProcessPoolExecutor

import triton

from fasttransformer.kernels import aot

CANDIDATES = [(128, 32, 8, 2), (128, 32, 8, 1), (128, 16, 8, 2), (128, 16, 8, 3), (128, 32, 8, 3), (128, 64, 8, 1)]

if __name__ == "__main__":
    jobs = [("forward", 80, 128, config, options, "bf16") for config in CANDIDATES
            for options in ({"PACK_GQA": True}, {"PACK_GQA": True, "SPLIT_KEYS": True})]
    with ProcessPoolExecutor(2) as pool:
        for job, report in zip(jobs, pool.map(aot._compile_job, jobs)):
            print(f"triton {triton.__version__} {job[3]} {job[4]}: {report['registers']} registers, "
                  f"{report['stack_bytes']} stack bytes, {report['shared_bytes']} shared bytes", flush=True)
