#!/usr/bin/env bash
# The GPU measurements, for the device tool (each part fits one call):
#   PYTHON=.venv/bin/python ../shared/gpu/wheels.sh      # once, here: the wheels the GPU image lacks
#   run(command="bash bench/gpu.sh step", carry=[".whl"], timeout_s=480)     # ≈ 6 min
#   run(command="bash bench/gpu.sh labels", carry=[".whl"], timeout_s=480)   # ≈ 6 min
# Each step has its own time limit, so one that hangs cannot take the others' time. Results:
# $OUT (the device tool's folder) or bench/results.
#
# A dry run on a CPU (the test suite's): every row of a part starts at toy size, in seconds, and
# writes its JSON, so no GPU minute is spent on a bench that a change broke:
#   DRY_RUN=1 PYTHON=.venv/bin/python OUT=/tmp/dry bash bench/gpu.sh step
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
smoke=()
status=0
if [ -n "${DRY_RUN:-}" ]; then
  smoke=(--smoke)
  # Toy programs compile twice as fast without XLA:CPU's expensive optimizations and its MLIR
  # fusion emitters (the step part's dry run: 54 → 35 s).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
  echo "dry run: toy sizes on $("$py" -c 'from mlcd_jax.runtime import backend; backend.choose(); import jax; print(jax.default_backend())')"
else
  if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  "$py" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" \
    | tee -a "$out/gpu.txt"
fi
export PYTHONUNBUFFERED=1
# One timed command; a failure is reported and the next one still runs.
run() {
  local limit=$1; shift
  timeout "$limit" "$py" "$@" "${smoke[@]}" || { echo "FAILED ($?): $*" >&2; status=1; }
}
part="${1:-step}"
if [ "$part" = step ]; then
  # Attention: does cuDNN take our padded shapes, how fast, how close to float32 XLA (≈ 40 s).
  run 90 bench/attention.py --out "$out/attention.json"
  # The train step against PyTorch (≈ 5 min): ours on the MLCD recipe, RoPE K = 1k, CLIP-style;
  # ours with the XLA attention and with float32 head matmuls (what they are worth); PyTorch
  # MLCDVisionModel / CLIPVisionModel eager and compiled.
  run 330 bench/train_step.py --preset gpu --out "$out/train_step_gpu.json" \
    --variant xla_attention=model.attention=xla --variant f32_head=head.matmul_dtype=float32
elif [ "$part" = labels ]; then
  # The jax label backend at N = 10M (K = 100k and 1M), faiss-cpu on the 16 cores at N = 1M.
  run 300 bench/labels.py --points 10000000 --centers 100000,1000000 --backends jax \
    --rounds 1 --niter 1 --json "$out/labels_gpu_jax.json"
  run 150 bench/labels.py --points 1000000 --centers 100000 --backends faiss \
    --rounds 1 --niter 1 --json "$out/labels_gpu_faiss.json"
else
  echo "usage: bash bench/gpu.sh [step|labels]" >&2; exit 2
fi
echo "done: $out"
exit $status
