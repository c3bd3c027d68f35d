#!/usr/bin/env bash
# The GPU measurements, for the device tool (each part fits one call):
#   PYTHON=.venv/bin/python ../shared/gpu/wheels.sh      # once, here: the wheels the GPU image lacks
#   run(command="bash bench/gpu.sh step", carry=[".whl"], timeout_s=480)     # ≈ 6 min
#   run(command="bash bench/gpu.sh labels", carry=[".whl"], timeout_s=480)   # ≈ 6 min
# Each step has its own time limit, so one that hangs cannot take the others' time. Results:
# $OUT (the device tool's folder) or bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" \
  | tee -a "$out/gpu.txt"
part="${1:-step}"
if [ "$part" = step ]; then
  # Attention: does cuDNN take our padded shapes, how fast, how close to float32 XLA (≈ 40 s).
  timeout 90 python3 bench/attention.py --out "$out/attention.json"
  # The train step against PyTorch (≈ 5 min): ours on the MLCD recipe, RoPE K = 1k, CLIP-style;
  # ours with the XLA attention and with float32 head matmuls (what they are worth); PyTorch
  # MLCDVisionModel / CLIPVisionModel eager and compiled.
  timeout 330 python3 bench/train_step.py --out "$out/train_step_gpu.json" \
    --variant xla_attention=model.attention=xla --variant f32_head=head.matmul_dtype=float32
elif [ "$part" = labels ]; then
  # The jax label backend at N = 10M (K = 100k and 1M), faiss-cpu on the 16 cores at N = 1M.
  timeout 300 python3 bench/labels.py --points 10000000 --centers 100000,1000000 --backends jax \
    --rounds 1 --niter 1 --json "$out/labels_gpu_jax.json"
  timeout 150 python3 bench/labels.py --points 1000000 --centers 100000 --backends faiss \
    --rounds 1 --niter 1 --json "$out/labels_gpu_faiss.json"
else
  echo "usage: bash bench/gpu.sh [step|labels]" >&2; exit 2
fi
echo "done: $out"
