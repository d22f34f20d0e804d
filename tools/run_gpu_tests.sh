#!/usr/bin/env bash
# The GPU suite in one command, run on a CUDA GPU with FP8 compute before a kernel change lands:
#
#   tools/run_gpu_tests.sh [extra pytest arguments]
#
# Runs `pytest -m gpu tests/test_gpu*.py` (the fused quantizer's launch paths, the _scaled_mm, block-scaled, int8
# and 8-bit attention kernels, the text-encoder recipes on CUDA) and writes a summary (GPU name, torch, triton and
# CUDA versions, commit, pass/fail/skip counts by file, the failed tests) to
# bench/results/gpu-tests-<gpu>.json, which tools/render_bench_table.py shows on docs/benchmarks.md.
# Exits with pytest's status. FP8_GPU_TESTS_OUT=PATH writes the summary elsewhere; PYTHON picks the interpreter;
# FP8_GPU_TEST_FILES="tests/test_gpu.py ..." runs part of the suite (join the parts' summaries with
# `python tools/gpu_test_summary.py --merge PART.json ... OUT.json`).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
report="$(mktemp -d)/gpu-tests.xml"
gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" \
  2>/dev/null || echo none)
if [ "$gpu" = none ]; then
  echo "tools/run_gpu_tests.sh: no CUDA GPU visible to $PYTHON: the GPU tests would all skip" >&2
  exit 2
fi
slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
out=${FP8_GPU_TESTS_OUT:-bench/results/gpu-tests-$slug.json}
start=$SECONDS
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
  --junitxml="$report" ${FP8_GPU_TEST_FILES:-tests/test_gpu*.py} "$@"
status=$?
if [ -f "$report" ]; then
  "$PYTHON" tools/gpu_test_summary.py "$report" "$out" --seconds $((SECONDS - start))
fi
exit $status
