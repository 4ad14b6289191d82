#!/usr/bin/env bash
# `make gpu-check`: everything the GPU machine must run, in one go (see ../shared/GPU.md).
# Builds the extension with the machine's python3 (nothing is installed), runs the benchmarks and
# the whole test suite on CUDA, and writes under $OUT (or benchmarks/results/<date>-<gpu>/) at
# most 8 files, what the device tool brings back: gpu-check.log (build, info, tests) and the
# benchmark records attention.{json,md,png}, embedding.{json,md}, model.{json,md}.
# BENCH_ARGS chooses the attention sweep (default --quick, to stay inside one 10-minute call;
# BENCH_ARGS="" runs the full sweep). Prints a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'nogpu')")
out=${OUT:-benchmarks/results/$(date +%Y-%m-%d)-$gpu}
log="$out/gpu-check.log"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
section() { echo "== $*" | tee -a "$log"; }

$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$log"
section build
if ! MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >> "$log" 2>&1; then
  tail -40 "$log"; echo "BUILD FAILED"; exit 1
fi
grep -iE "spill|lmem" "$log" | head -20
$PY -m fasttransformer info 2>&1 | tee -a "$log"

section benchmarks
$PY -m fasttransformer bench embedding --out "$out" >> "$log" 2>&1; bench_rc=$?
$PY -m fasttransformer bench model --out "$out" >> "$log" 2>&1 || bench_rc=1
$PY -m fasttransformer bench attention ${BENCH_ARGS---quick} --out "$out" >> "$log" 2>&1 || bench_rc=1

section tests
# The attention kernels run in a process of their own, last: a kernel fault on the GPU ends its
# process, and must not take the other results with it.
$PY -m pytest tests -q -rs --ignore=tests/test_attention.py >> "$log" 2>&1
tests_rc=$?
section attention tests
$PY -m pytest tests/test_attention.py -q -rs -x >> "$log" 2>&1
attention_rc=$?

section "summary ($out)"
grep -E "^(=+ )?[0-9]+ (passed|failed)|passed|failed" "$log" | tail -2
for subject in embedding model attention; do [ -f "$out/$subject.md" ] && cat "$out/$subject.md"; done
echo "bench rc $bench_rc, tests rc $tests_rc, attention tests rc $attention_rc"
exit $(( tests_rc != 0 || attention_rc != 0 || bench_rc != 0 ))
