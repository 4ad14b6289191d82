#!/usr/bin/env bash
# `make gpu-check`: everything the GPU machine must run, in one go (see ../shared/GPU.md).
# Builds the extension with the machine's python3 (nothing is installed), runs the benchmarks and
# the whole test suite on CUDA, and writes under $OUT (or benchmarks/results/<date>-<gpu>/) at
# most 8 files, what the device tool brings back: gpu-check.log (build, info, tests) and the
# benchmark records attention.{json,md,png}, embedding.{json,md}, model.{json,md}.
# BENCH_ARGS chooses the attention sweep (default --quick, to stay inside one 10-minute call;
# BENCH_ARGS="" runs the full sweep). The tests stop (SIGINT: pytest still prints its summary)
# DEADLINE_S seconds after the start (default 570, inside the device tool's 10-minute call), so
# their logs come back even when the time runs out; the attention sweep stops TESTS_MIN_S (240)
# before that deadline, keeping the cases it timed. STEPS="tests" (or "bench") runs one part only,
# for a second call. Prints a summary last.
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
# A failed build does not end the run: the Triton attention kernels need no build, so their tests
# and benchmarks still run (the embedding op's fail, naming _C), and the log says why it failed.
build_rc=0
if ! MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >> "$log" 2>&1; then
  build_rc=1
  tail -40 "$log"; echo "BUILD FAILED: going on without fasttransformer._C" | tee -a "$log"
fi
grep -iE "spill|lmem" "$log" | head -20
$PY -m fasttransformer info 2>&1 | tee -a "$log"

steps=" ${STEPS:-bench tests} "
bench_rc=0 tests_rc=0 shards=0 shard_status=()
if [[ $steps == *" bench "* ]]; then
  section benchmarks
  $PY -m fasttransformer bench embedding --out "$out" >> "$log" 2>&1 || bench_rc=1
  $PY -m fasttransformer bench model --out "$out" >> "$log" 2>&1 || bench_rc=1
  # The attention sweep stops (SIGINT) in time to leave the tests TESTS_MIN_S (default 240) of the
  # deadline; it writes its record after every case, so a stopped sweep keeps what it timed
  # (attention.md says "Partial record").
  reserve=0
  [[ $steps == *" tests "* ]] && reserve=${TESTS_MIN_S:-240}
  bench_left=$(( ${DEADLINE_S:-570} - SECONDS - reserve ))
  (( bench_left >= 60 )) || bench_left=60
  timeout -s INT -k 15 "$bench_left" $PY -m fasttransformer bench attention ${BENCH_ARGS---quick} --out "$out" \
    >> "$log" 2>&1 || bench_rc=$?
  (( bench_rc == 124 || bench_rc == 137 )) && echo "attention sweep stopped after $bench_left s (partial record)" | tee -a "$log"
fi

if [[ $steps == *" tests "* ]]; then
  section tests
  # TEST_SHARDS processes at once (FASTTRANSFORMER_TEST_SHARD, tests/conftest.py): on a fresh
  # machine the Triton JIT compiles every kernel variant the tests launch, one at a time per
  # process: the CPU suite alone launches 513 distinct specializations (counted under the
  # interpreter), ~1.2 s each to compile (the AOT check's rate), over 10 minutes in one process.
  # The shards share the GPU and Triton's on-disk cache. Each shard is a process of its
  # own, so a kernel fault on the GPU ends one shard, not the others. Their logs are appended to
  # gpu-check.log in order (only 8 files come back from the device machine). The ahead-of-time
  # compile check (marker aot: 493 compiles on the CPU, the same on any machine) is CI's: left out.
  shards=${TEST_SHARDS:-8}
  shard_logs=$(mktemp -d)
  left=$(( ${DEADLINE_S:-570} - SECONDS ))
  (( left >= 30 )) || left=30
  echo "tests: $shards shards, stopped after $left s" | tee -a "$log"
  pids=()
  for ((shard = 0; shard < shards; shard++)); do
    FASTTRANSFORMER_TEST_SHARD=$shard/$shards timeout -s INT -k 15 "$left" \
      $PY -m pytest tests -q -rs -p no:cacheprovider --maxfail=20 --durations=5 -m "not aot" \
      > "$shard_logs/$shard.log" 2>&1 &
    pids+=($!)
  done
  for ((shard = 0; shard < shards; shard++)); do
    wait "${pids[$shard]}"; rc=$?
    (( rc == 0 )) || tests_rc=1
    status="rc $rc"; (( rc == 124 || rc == 137 )) && status="stopped at the deadline (rc $rc)"
    shard_status+=("shard $shard/$shards, $status: $(tail -1 "$shard_logs/$shard.log")")
    echo "-- ${shard_status[$shard]}" >> "$log"; cat "$shard_logs/$shard.log" >> "$log"
  done
fi

section "summary ($out)"
(( shards == 0 )) || printf '%s\n' "${shard_status[@]}"
for subject in embedding model attention; do [ -f "$out/$subject.md" ] && cat "$out/$subject.md"; done
echo "build rc $build_rc, bench rc $bench_rc, tests rc $tests_rc"
exit $(( build_rc != 0 || tests_rc != 0 || bench_rc != 0 ))
