#!/usr/bin/env bash
# The planning tables of docs/planning.md: the paper recipes (K = 1M, batch 32,768, remat, bf16,
# scanned blocks) compiled by `python -m mlcd_jax.plan` for public TPU topologies, or for one and
# eight hosts of 8 H100s / H200s. Needs libtpu / jax's CUDA plugin (`make plan-env`).
#   bash bench/plan_table.sh tpu|gpu [OUT_DIR] [--config.field=value ...]
#       one JSON per row in OUT_DIR (default bench/results/plan_tpu|plan_gpu), then the table
#   SMOKE=1 bash bench/plan_table.sh gpu /tmp/x      # one toy row per part, seconds (the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-tpu}"
out="${2:-bench/results/plan_$kind}"
extra=("${@:3}")
PY="${PY:-.venv/bin/python}"
case "$kind" in
  tpu) topologies=(v5e:16x16 v5p:4x4x4 v6e:8x8) ;;
  gpu) topologies=(h100:8 h100:8x8 h200:8 h200:8x8) ;;
  *) echo "usage: bash bench/plan_table.sh tpu|gpu [OUT_DIR] [--config.field=value ...]" >&2
     exit 2 ;;
esac
configs=(configs/mlcd_laion400m.py:B/32 configs/mlcd_laion400m.py:B/16
         configs/mlcd_laion400m.py:L/14)
if [ -n "${SMOKE:-}" ]; then
  configs=(configs/test_tiny.py)
  if [ "$kind" = tpu ]; then topologies=(v5e:2x2); else topologies=(h100:2); fi
fi
mkdir -p "$out"
for config in "${configs[@]}"; do
  for topology in "${topologies[@]}"; do
    if [[ "$config" == *:* ]]; then name="${config##*:}"; else name="$(basename "$config" .py)"; fi
    echo "== $name on $topology" >&2
    "$PY" -m mlcd_jax.plan --config="$config" --topology="$topology" \
      --json="$out/${name//\//}_${topology/:/_}.json" ${extra[@]+"${extra[@]}"}
  done
done
"$PY" - "$out" "$kind" <<'PY'
import json, pathlib, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))]
gib = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"
if sys.argv[2] == "tpu":
    print("| recipe | topology | devices | per-device memory (args + temp) | HBM | fits | TFLOP/step | images/s at 50% MFU | days (32 epochs) |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['topology']} | {r['devices']} | {r['argument_gib']:.1f} + {r['temporary_gib']:.1f} = "
              f"{r['total_gib']:.1f} GiB | {r['hbm_gib']:.0f} GiB | {'yes' if r['fits'] else 'no'} | "
              f"{r['tflops_per_step']:,.0f} | {r['images_per_s']:,.0f} | {r['days']:.2f} |")
    sys.exit()
print("| recipe | GPUs | per-GPU memory (args + temp) | of (jax's pool) | fits | kernels: fusions + library calls, launches/step | collectives per step | roofline step (estimate) | images/s at 50 % MFU | days (32 epochs) |")
print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
for r in rows:
    p = r["program"]
    coll = ", ".join(f"{k} {gib(v['bytes'])}" for k, v in sorted(p["collectives"].items())) or "none"
    roof = p["roofline"]
    print(f"| {r['config']} | {r['topology']} | {r['argument_gib']:.1f} + {r['temporary_gib']:.1f} = {r['total_gib']:.1f} GiB | "
          f"{r['hbm_gib']:.0f} ({r['usable_gib']:.0f}) GiB | {'yes' if r['fits'] else 'no'} | "
          f"{p['fusions']} + {p['library_calls']}, {p['launches_per_step']:,.0f} | {coll} | "
          f"{roof['step_s']:.3f} s ({roof['bound']}) | {r['images_per_s']:,.0f} | {r['days']:.2f} |")
PY
