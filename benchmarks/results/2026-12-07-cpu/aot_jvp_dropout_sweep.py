"""Stop 36: the JVP kernel's dropout variants. Of the 120 new AOT jobs (the JVP kernel with
DROPOUT, bool mask and float mask with its tangent, 32- and 64-bit offsets), two spilled 16 bytes
with their key's config, both with dropout and 64-bit offsets (sm_80 D = 128 float mask with its
tangent at (128, 16, 8, 1); sm_90 D = 64 bool mask at (128, 64, 8, 2)). For each such (dtype kind,
arch, head-dim bucket, dropout, int64) this compiles the candidates of aot_jvp_sweep.py, largest
tiles first (no larger than the key's config), until one is clean in every job of the variant:
no spill, within the shared memory, on the tensor cores. Writes every report as JSON. (Run before
configs.JVP_VARIANT_OVERRIDES held its result: run now, it finds nothing to sweep.)

    env -u TRITON_INTERPRET .venv/bin/python benchmarks/results/2026-12-07-cpu/aot_jvp_dropout_sweep.py OUT.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_jvp_sweep import key, sweep  # noqa: E402

from fasttransformer.kernels import aot  # noqa: E402


def variant(job):
    options = job[4]
    return (*key(job), bool(options.get("DROPOUT")), bool(options.get("INT64_OFFSETS")))


def main(out):
    sweep([job for job in aot._jobs() if job[0] == "jvp" and job[4].get("DROPOUT")], variant, "table", out, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
