"""Stop 35: the JVP kernel's configs. Compiles every JVP job of the AOT list (kernels/aot.py) with
the dQ kernel's config, and, for each (dtype kind, arch, head-dim bucket) where one of its jobs
spills or passes the arch's shared memory, the candidates below, largest tiles first, until one
compiles clean (no spill, within the shared memory, on the tensor cores: ``tensor_cores``) in
every job of that key (bool mask and float mask with its tangent, 32- and 64-bit offsets, the
(D, Dv) pairs of the bucket). Writes every report as JSON. (Run before configs.JVP_OVERRIDES held
its result: aot._jobs gave every JVP job the dQ kernel's config then.)

    env -u TRITON_INTERPRET .venv/bin/python benchmarks/results/2026-12-07-cpu/aot_jvp_sweep.py OUT.json
"""
import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor

from fasttransformer.kernels import aot
from fasttransformer.kernels.configs import head_dim_bucket

CANDIDATES = sorted(itertools.product((128, 64, 32, 16), (64, 32, 16), (8, 4), (2, 1)),
                    key=lambda c: (-c[0] * c[1], -c[0], -c[3], -c[2]))


def bad(report):
    return bool(report["stack_bytes"]) or report["shared_bytes"] > aot.SHARED_MEMORY_LIMIT[report["arch"]]


def tensor_cores(report):
    """The products' instructions the AOT test asks for: wgmma on sm_90 where a product has 64
    rows or more (BLOCK_M here), else mma.sync."""
    return ["wgmma.mma_async"] if report["arch"] == 90 and report["config"][0] >= 64 else ["mma.sync"]


def key(job):
    name, arch, head_dim, config, options, dtype = job
    dims = head_dim if isinstance(head_dim, tuple) else (head_dim, head_dim)
    return ("fp32" if dtype == "fp32" else "2-byte", arch, head_dim_bucket(max(dims)))


def sweep(jobs, group_of, first_name, out, indent=0):
    """Compiles ``jobs`` with their configs, then, for each group (``group_of(job)``) where one
    spills or overflows, the candidates until one is clean in every job of the group; writes the
    reports (the first compiles under ``first_name``) and the choices to ``out``."""
    with ProcessPoolExecutor(2) as pool:
        first = list(pool.map(aot._compile_job, jobs))
        record = {first_name: first, "sweep": {}, "chosen": {}}
        failing = sorted({group_of(job) for job, report in zip(jobs, first) if bad(report)})
        print(f"{len(jobs)} jobs; {sum(map(bad, first))} spill or overflow; keys {failing}", flush=True)
        for failing_key in failing:
            group = [job for job in jobs if group_of(job) == failing_key]
            area = max(job[3][0] * job[3][1] for job in group)
            tries = record["sweep"].setdefault(" ".join(map(str, failing_key)), [])
            for candidate in CANDIDATES:
                if candidate[0] * candidate[1] > area:
                    continue
                reports = list(pool.map(aot._compile_job, [(*job[:3], candidate, *job[4:]) for job in group]))
                tries.append(reports)
                clean = not any(map(bad, reports)) and all(r["matrix_instructions"] == tensor_cores(r) for r in reports)
                print(failing_key, candidate, "clean" if clean else
                      f"stack {[r['stack_bytes'] for r in reports]}", flush=True)
                if clean:
                    record["chosen"][" ".join(map(str, failing_key))] = list(candidate)
                    break
    with open(out, "w") as file:
        json.dump(record, file, indent=indent)
    print(json.dumps(record["chosen"], indent=1))


def main(out):
    sweep([job for job in aot._jobs() if job[0] == "jvp"], key, "dq_config", out)


if __name__ == "__main__":
    main(sys.argv[1])
