#!/usr/bin/env bash
# `make gpu-check`: everything the GPU machine must run, in one go (see ../shared/GPU.md).
# Builds the extension with the machine's python3 (nothing is installed), runs the whole test
# suite on CUDA, runs the benchmark sweep, and writes logs/JSON/Markdown under $OUT (or
# benchmarks/results/<date>-<gpu>/): 8 files at most, what the device tool brings back. Prints a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'nogpu')")
out=${OUT:-benchmarks/results/$(date +%Y-%m-%d)-$gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
echo "== build"
if ! MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -iE "spill|lmem" "$out/build.log" | head -20
$PY -m fasttransformer info --json > "$out/info.json"
$PY -m fasttransformer info

echo "== benchmarks"
$PY benchmarks/bench_embedding.py --out "$out"
bench_rc=$?
$PY benchmarks/bench_model.py --out "$out" || bench_rc=1

echo "== tests"
# The attention kernels run in a process of their own, last: a kernel fault on the GPU ends its
# process, and must not take the other results with it.
$PY -m pytest tests -q -rs --ignore=tests/test_attention.py > "$out/tests.log" 2>&1
tests_rc=$?
tail -15 "$out/tests.log"
$PY -m pytest tests/test_attention.py -q -rs -x > "$out/tests_attention.log" 2>&1
attention_rc=$?
tail -15 "$out/tests_attention.log"

echo "== summary ($out)"
grep -E "passed|failed" "$out/tests.log" | tail -1
grep -E "passed|failed" "$out/tests_attention.log" | tail -1
[ -f "$out/embedding.md" ] && cat "$out/embedding.md"
[ -f "$out/model.md" ] && cat "$out/model.md"
exit $(( tests_rc != 0 || attention_rc != 0 || bench_rc != 0 ))
