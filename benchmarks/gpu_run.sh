#!/usr/bin/env bash
# Every GPU measurement of benchmarks/RESULTS.md and the CUDA tests, in one pass on one card.
#
#   bash benchmarks/gpu_run.sh [LOG_DIR]      # default LOG_DIR: gpu-logs/
#
# Each step has its own time limit, so one slow step cannot starve the others; each step's
# output goes to LOG_DIR/<step>.txt as well as the console. Needs a CUDA build of torch and the
# project's dependencies (pip install -e ".[dev]"), or PYTHONPATH pointing at them.
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-gpu-logs}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
export py=${PYTHON:-python}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${seconds}s): $*"
  timeout "$seconds" "$@" 2>&1 | tee "$log_dir/$name.txt"
  echo "=== $name exit ${PIPESTATUS[0]}"
}

step machine 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  $py -c "import torch, lightning; print(torch.__version__, lightning.__version__,
  torch.cuda.get_device_name(), torch.get_num_threads(), \"CPU threads\")"'
step tests 110 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  tests/test_cam_engine.py::test_on_cuda_with_fp16_autocast tests/test_cam_kinds.py -k "cuda or gpu"
step engine 90 "$py" benchmarks/bench_engine.py --device cuda --widths 32 64 --batch 8 \
  --size 256 --repeats 5
step scaling 90 "$py" benchmarks/bench_engine.py --device cuda --scaling --widths 32 \
  --batch 4 --repeats 5
step drawing 30 "$py" benchmarks/bench_drawing.py --device cuda
step explain 50 "$py" benchmarks/bench_explain.py --device cuda --size 256 --width 64 \
  --num 256 --batch-size 16 --repeats 2
step callback 200 "$py" benchmarks/bench_callback.py --repeats 2
