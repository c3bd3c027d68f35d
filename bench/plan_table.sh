#!/usr/bin/env bash
# The README's TPU planning table: the paper recipes (K = 1M, batch 32,768, remat, bf16) compiled
# by `python -m mlcd_jax.plan` for a few public TPU topologies. Needs libtpu (`make plan-env`).
#   bash bench/plan_table.sh [OUT_DIR]        # one JSON per row in OUT_DIR (default bench/results/plan)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/plan}"
mkdir -p "$out"
PY="${PY:-.venv/bin/python}"
for recipe in B/32 B/16 L/14; do
  for topology in v5e:16x16 v5p:4x4x4 v6e:8x8; do
    echo "== $recipe on $topology" >&2
    "$PY" -m mlcd_jax.plan --config="configs/mlcd_laion400m.py:$recipe" --topology="$topology" \
      --json="$out/${recipe/\//}_${topology/:/_}.json" 2>&1 | grep -v "libtpu\|Source Location\|^=\|WARNING\|E0000\|^Failed" || true
  done
done
"$PY" - "$out" <<'PY'
import json, pathlib, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))]
print("| recipe | topology | devices | per-device memory (args + temp) | HBM | fits | TFLOP/step | images/s at 50% MFU | days (32 epochs) |")
print("|---|---|---:|---:|---:|---|---:|---:|---:|")
for r in rows:
    print(f"| {r['config']} | {r['topology']} | {r['devices']} | {r['argument_gib']:.1f} + {r['temporary_gib']:.1f} = "
          f"{r['total_gib']:.1f} GiB | {r['hbm_gib']:.0f} GiB | {'yes' if r['fits'] else 'no'} | "
          f"{r['tflops_per_step']:,.0f} | {r['images_per_s']:,.0f} | {r['days']:.2f} |")
PY
