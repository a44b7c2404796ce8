#!/usr/bin/env bash
# One GPU session, prepared so that a single call yields every figure it can: the GPU tests, then
# the benchmark's target cases (each part under its own time limit; JSON lines stream into $OUT,
# so a part cut short keeps what it finished). Run from the repository root on a CUDA machine:
#   OUT=outputs/device bash benchmarks/device_run.sh
# Wheels the machine lacks (diffusers, peft, torch-fidelity) may be carried in .whl/.
set -u
OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia.txt"
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/nvidia.txt"

echo "== pytest -m gpu"
DEFECTLAB_GPU_REPORT=$OUT/gpu_report.jsonl TORCHINDUCTOR_COMPILE_THREADS=1 timeout "${TEST_S:-190}" \
  python3 -m pytest -m gpu -n "${TEST_WORKERS:-6}" -p no:cacheprovider -p no:logging -q -rfE tests/test_gpu.py \
  2>&1 | tee "$OUT/pytest_gpu.log" | grep -vE "^(DEBUG|INFO|WARNING)" | tail -40

bench() {  # seconds, then benchmark arguments
  local limit=$1; shift
  echo "== xl_speed $*"
  timeout "$limit" python3 benchmarks/xl_speed.py "$@" 2>>"$OUT/xl_speed.err" | tee -a "$OUT/xl_speed.jsonl" | grep -v '^{' 
}
bench "${SAMPLE_S:-165}" --only sample --sample-scope blocks --sample-variants bf16,graphs,compiled
bench "${TRAIN32_S:-120}" --only train --methods bitfit,difffit --batches 32 --train-variants eager,compiled
bench "${TRAIN8_S:-100}" --only train --methods bitfit,difffit --batches 8 --train-variants lowmem,lowmem-graphs
tail -5 "$OUT/xl_speed.err"
