"""Stop 36: the JVP kernel's dropout variants. Of the 120 new AOT jobs (the JVP kernel with
DROPOUT, bool mask and float mask with its tangent, 32- and 64-bit offsets), two spilled 16 bytes
with their key's config, both with dropout and 64-bit offsets (sm_80 D = 128 float mask with its
tangent at (128, 16, 8, 1); sm_90 D = 64 bool mask at (128, 64, 8, 2)). For each such (dtype kind,
arch, head-dim bucket, dropout, int64) this compiles the candidates of aot_jvp_sweep.py, largest
tiles first (no larger than the key's config), until one is clean in every job of the variant:
no spill, within the shared memory, on the tensor cores. Writes every report as JSON.

    env -u TRITON_INTERPRET .venv/bin/python benchmarks/results/2026-12-07-cpu/aot_jvp_dropout_sweep.py OUT.json
"""
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_jvp_sweep import CANDIDATES, bad, key, tensor_cores  # noqa: E402

from fasttransformer.kernels import aot  # noqa: E402


def variant(job):
    options = job[4]
    return (*key(job), bool(options.get("DROPOUT")), bool(options.get("INT64_OFFSETS")))


def main(out):
    jobs = [job for job in aot._jobs() if job[0] == "jvp" and job[4].get("DROPOUT")]
    with ProcessPoolExecutor(2) as pool:
        first = list(pool.map(aot._compile_job, jobs))
        record = {"table": first, "sweep": {}, "chosen": {}}
        failing = sorted({variant(job) for job, report in zip(jobs, first) if bad(report)})
        print(f"{len(jobs)} jobs; {sum(map(bad, first))} spill or overflow; variants {failing}", flush=True)
        for failing_variant in failing:
            group = [job for job in jobs if variant(job) == failing_variant]
            area = max(job[3][0] * job[3][1] for job in group)
            tries = record["sweep"].setdefault(" ".join(map(str, failing_variant)), [])
            for candidate in CANDIDATES:
                if candidate[0] * candidate[1] > area:
                    continue
                reports = list(pool.map(aot._compile_job, [(*job[:3], candidate, *job[4:]) for job in group]))
                tries.append(reports)
                clean = not any(map(bad, reports)) and all(r["matrix_instructions"] == tensor_cores(r) for r in reports)
                print(failing_variant, candidate, "clean" if clean else
                      f"stack {[r['stack_bytes'] for r in reports]}", flush=True)
                if clean:
                    record["chosen"][" ".join(map(str, failing_variant))] = list(candidate)
                    break
    with open(out, "w") as file:
        json.dump(record, file, indent=1)
    print("chosen", record["chosen"])


if __name__ == "__main__":
    main(sys.argv[1])
