#!/usr/bin/env bash
# The GPU checks in one go, from the repository root, for a machine with a CUDA device:
#   1. the CUDA tests (tests/test_cuda.py);
#   2. the full-size benchmark's training-step, evaluation and memory cases;
#   3. the training-step cases again with the opt-in CUDA graphs (FAST.CUDA_GRAPHS);
#   4. the warm evaluation and a one-seed sweep;
#   5. the training-step and memory cases with the text side truncated at every class count
#      (FAST.TEXT truncate), against which FAST.GPU_SHARED_PREFIX_MIN_CLASSES is chosen.
# Each part writes its output (and the benchmark's JSON) to OUT_DIR and the next part runs
# even if one fails; a part that outlasts its limit (seconds, PART_LIMIT, default 600) is
# stopped. Usage: bash benchmarks/gpu_checks.sh [OUT_DIR]   (PYTHON=... to pick the python,
# words allowed, e.g. PYTHON="python3 -P" where the checkout must not shadow installed code;
# PARTS="cuda_tests full ..." to run only those parts, e.g. one group per call where a
# machine limits each command's time: all five take about 10-12 minutes on an H200)
set -u
out="${1:-gpu_checks}"
read -r -a py <<<"${PYTHON:-python}"
limit="${PART_LIMIT:-600}"
all_parts="cuda_tests full graphs runs truncate"
parts=" ${PARTS:-$all_parts} "
for p in $parts; do
  if [[ " $all_parts " != *" $p "* ]]; then
    echo "gpu_checks.sh: unknown part '$p' in PARTS; the parts are: $all_parts" >&2
    exit 2
  fi
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1

part() {  # name, command...
  local name="$1"
  shift
  [[ "$parts" == *" $name "* ]] || return 0
  echo "== $name: $*"
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  grep -E "passed|failed|skipped|error|SUMMARY|PASS|FAIL|^case" "$out/$name.txt" | grep -v -i warning
  echo "== $name: exit $rc"
}

part cuda_tests "${py[@]}" -m pytest -q tests/test_cuda.py
part full "${py[@]}" benchmarks/run.py --device cuda \
  --cases train_step_100,train_step_1000,text_fraction,eval_1000,memory_1000 \
  --json "$out/full.json"
part graphs "${py[@]}" benchmarks/run.py --device cuda \
  --cases train_step_100,train_step_1000,text_fraction \
  --fast-opt FAST.CUDA_GRAPHS=True --json "$out/graphs.json"
part runs "${py[@]}" benchmarks/run.py --device cuda --cases eval_warm,sweep --sweep-seeds 1 \
  --json "$out/runs.json"
part truncate "${py[@]}" benchmarks/run.py --device cuda \
  --cases train_step_100,train_step_1000,memory_1000 \
  --fast-opt FAST.TEXT=truncate --json "$out/truncate.json"
