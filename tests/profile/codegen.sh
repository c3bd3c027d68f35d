#!/bin/bash
# CPU-seconds (user + system) of three commands the suite runs, each cold (a fresh compilation
# cache) and then warm (the same cache), under the XLA code-generation flags given: how a choice
# in tests/helpers/commands.py (FAST_COMPILE, COMMAND_COMPILE, TRAIN_COMPILE) trades compiling for running.
#
#   bash tests/profile/codegen.sh "--xla_backend_optimization_level=1"
#   bash tests/profile/codegen.sh "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
#
# The commands: the tiny trainer for 120 steps and the :regions config for 10 (8 devices), and a
# 150-step LiT (2 devices) against a random micro ViT. One line: cold | warm. Run it with nothing
# else on the machine: the figures move by ~10 % between runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
flags="${1:?usage: codegen.sh \"<XLA flags>\"}"
py=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR="$work/cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
$py - "$work/encoder" <<'EOF'
import sys
from mlcd_jax.interop import weights  # first: it starts jax quietly
from mlcd_jax.models import vit
from flax import nnx
weights.save_model_dir(vit.ViT(vit.vit_config("micro", image_size=32, embed_dim=16),
                               rngs=nnx.Rngs(0)), sys.argv[1])
EOF

cpu() {  # devices, command...: its CPU-seconds
  local devices=$1 run="$work/run.$RANDOM"; shift
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices $flags" \
    /usr/bin/time -f "%U %S" -o "$run.time" "$@" --workdir="$run" > "$run.log" 2>&1 \
    || { echo "failed: $*" >&2; tail -5 "$run.log" >&2; exit 1; }
  awk '{printf "%.1f", $1 + $2}' "$run.time"
}

line="$flags |"
for _ in cold warm; do
  line+=" tiny 120 steps $(cpu 8 $py -m mlcd_jax.train --config=configs/test_tiny.py \
    --config.total_steps=120 --config.log_every=1 --config.checkpoint_every=1000)"
  line+=", regions 10 steps $(cpu 8 $py -m mlcd_jax.train --config=configs/test_tiny.py:regions \
    --config.total_steps=10)"
  line+=", LiT 150 steps $(cpu 2 $py -m mlcd_jax.lit --config=configs/lit_demo.py \
    --config.log_every=1 --config.evals.every=0 --config.total_steps=150 \
    --config.image.model="$work/encoder") |"
done
echo "$line"
