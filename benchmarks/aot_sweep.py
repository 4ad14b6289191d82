"""Finds, for the config-table entries that spill under some Triton, the nearest config that is
clean (no stack bytes, shared memory within the arch's limit, wgmma kept on sm_90) in every
variant the AOT check compiles, under every Triton given, each in its own Python environment.

    python benchmarks/aot_sweep.py --python .venv/bin/python --python /tmp/v37/bin/python \\
        --reports aot-3.7.json --reports aot-3.8.json --out sweep.json

``--reports``: the output of ``python -m fasttransformer.kernels.aot`` under a Triton; the
groups to sweep are those with a spilling variant in any of them. A group is (kernel, arch,
head dim, dtype, dropout, int64 offsets): the key by which configs.py picks a config (a value head
dim unlike the query's is left out: configs.PADDED_VALUE_HEAD_DIMS handles its spills). Its
candidates are the current config with BLOCK_M and BLOCK_N kept or halved, 8 or 4 warps and 2 or
1 stages, tried from the largest tile down; the first that is clean under every Triton wins.
Each ``--python`` runs a worker (``--worker``) that compiles jobs read from its stdin, so the
environments differ only in what is installed; the code compiled is this checkout's
(PYTHONPATH). Prints the chosen config per group and writes every compile to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"attention_forward_kernel": "forward", "attention_backward_dkdv_kernel": "dkdv",
         "attention_backward_dq_kernel": "dq"}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}  # as the AOT test holds them


def group_of(name, arch, head_dim, dtype, options):
    return (name, arch, head_dim, dtype, bool(options.get("DROPOUT")), bool(options.get("INT64_OFFSETS")))


def rows(name, config):
    """The rows of the kernel's products (dK/dV works on S^T): wgmma on sm_90 needs 64."""
    return config[1] if name == "dkdv" else config[0]


def candidates(name, arch, config):
    block_m, block_n, num_warps, num_stages = config
    keep_wgmma = arch == 90 and rows(name, config) >= 64
    found = {(m, n, w, s) for m in {block_m, block_m // 2} for n in {block_n, block_n // 2}
             for w in (8, 4) for s in (2, 1) if m >= 16 and n >= 16} - {tuple(config)}
    if keep_wgmma:
        found = {c for c in found if rows(name, c) >= 64}
    return sorted(found, key=lambda c: (c[0] * c[1], c[2] == num_warps, c[3], c[0]), reverse=True)


def clean(report):
    if report["stack_bytes"] or report["shared_bytes"] > SHARED_LIMIT[report["arch"]]:
        return False
    if report["arch"] == 90 and rows(NAMES[report["kernel"]], report["config"]) >= 64:
        return "wgmma.mma_async" in report["matrix_instructions"]
    return True


def worker():
    from fasttransformer.kernels.aot import _compile_job
    for line in sys.stdin:
        jobs = json.loads(line)
        reports = [_compile_job((name, arch, head_dim, tuple(config), options, dtype))
                   for name, arch, head_dim, config, options, dtype in jobs]
        print(json.dumps(reports), flush=True)


class Worker:
    def __init__(self, python):
        env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": ROOT,
               "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="aot-sweep-cache-")}
        self.process = subprocess.Popen([python, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                                 text=True, env=env, check=True)
        self.triton = version.stdout.strip()

    def send(self, jobs):
        self.process.stdin.write(json.dumps(jobs) + "\n")
        self.process.stdin.flush()

    def receive(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the triton {self.triton} worker died")
        return json.loads(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--python", action="append", default=[], help="a Python with a Triton (repeat)")
    parser.add_argument("--reports", action="append", default=[], help="an AOT report (JSON) to take groups from")
    parser.add_argument("--out", required=False, help="every compile of the sweep, as JSON")
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if not args.python or not args.reports:
        parser.error("give --python and --reports")
    sys.path.insert(0, ROOT)
    from fasttransformer.kernels.aot import _jobs
    jobs = [job for job in _jobs() if job[0] in NAMES.values() and not isinstance(job[2], tuple)]
    groups = sorted({group_of(NAMES[r["kernel"]], r["arch"], r["head_dim"], r["dtype"], r["options"])
                     for path in args.reports for r in json.load(open(path))
                     if r["stack_bytes"] and r["kernel"] in NAMES
                     and r.get("head_dim_v", r["head_dim"]) == r["head_dim"]})  # (D, Dv) pairs: padded instead
    workers = [Worker(python) for python in args.python]
    record = {"tritons": [w.triton for w in workers], "groups": []}
    for group in groups:
        variants = [job for job in jobs if group_of(job[0], job[1], job[2], job[5], job[4]) == group]
        current = variants[0][3]
        entry = {"group": group, "current": current, "tried": [], "chosen": None}
        for config in candidates(group[0], group[1], current):
            batch = [(name, arch, head_dim, config, options, dtype)
                     for name, arch, head_dim, _, options, dtype in variants]
            for w in workers:
                w.send(batch)
            results = {w.triton: w.receive() for w in workers}
            ok = all(clean(r) for reports in results.values() for r in reports)
            entry["tried"].append({"config": config, "clean": ok, "reports": results})
            print(group, config, "clean" if ok else
                  {t: max(r["stack_bytes"] for r in reports) for t, reports in results.items()}, flush=True)
            if ok:
                entry["chosen"] = config
                break
        record["groups"].append(entry)
    for w in workers:
        w.process.stdin.close()
        w.process.wait()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    for entry in record["groups"]:
        print(entry["group"], tuple(entry["current"]), "->", entry["chosen"] and tuple(entry["chosen"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
