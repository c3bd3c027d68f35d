"""Sharded head benchmark: per-device compiled memory and forward + backward step time.

    .venv/bin/python bench/head.py                       # K = 1M, D = 512, B = 256, 1 vs 8 devices
    .venv/bin/python bench/head.py --classes 10000,100000,1000000 --ratios 0.01,0.1,1.0 \\
        --devices 1,2,4,8
    .venv/bin/python bench/head.py --smoke --json /tmp/head.json   # toy sizes, seconds (the tests)

Devices are simulated on the host CPU unless a GPU/TPU is present. Simulated devices share the
host's cores, so on CPU a larger n lowers per-device memory but cannot lower the step time. The
machine's speed drifts (DESIGN.md), so a float32 matmul probe runs before and after: compare rows
only within one run. Prints a table and writes JSON (default bench/results/head.json).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.runtime import backend  # noqa: E402, I001

backend.choose()  # before jax starts: the platform, quietly (as every command)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import probe  # noqa: E402  (bench/probe.py)

from mlcd_jax.runtime import mesh as mesh_lib  # noqa: E402
from mlcd_jax.training import sharded_head as head  # noqa: E402


def run_case(devices, *, classes, dim, batch, labels, ratio, steps, chunk):
    mesh = mesh_lib.make_mesh([("data", -1)], devices)
    rows = mesh_lib.padded_num_classes(classes, mesh.size)
    batch_sh, class_sh = mesh_lib.batch_sharding(mesh), mesh_lib.class_sharding(mesh)

    # Inputs are made on the devices, directly sharded: nothing K × D passes through the host.
    @jax.jit
    def make_inputs(key):
        kf, kc, ky = jax.random.split(key, 3)
        features = jax.lax.with_sharding_constraint(
            jax.random.normal(kf, (batch, dim)), batch_sh)
        centers = jax.lax.with_sharding_constraint(jax.random.normal(kc, (rows, dim)), class_sh)
        ids = jax.lax.with_sharding_constraint(
            jax.random.randint(ky, (batch, labels), 0, classes, jnp.int32), batch_sh)
        return features, centers, ids

    def loss(features, centers, ids, key):
        return head.mlcd_loss(features, centers, ids, key=key, mesh=mesh, num_classes=classes,
                              sample_ratio=ratio, chunk=chunk)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    features, centers, ids = make_inputs(jax.random.key(0))
    t = time.perf_counter()
    compiled = step.lower(features, centers, ids, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(features, centers, ids, jax.random.key(1)))  # warm-up
    times = []
    for i in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(features, centers, ids, jax.random.key(2 + i)))
        times.append(time.perf_counter() - t)
    return {
        "devices": mesh.size, "classes": classes, "dim": dim, "batch": batch, "labels": labels,
        "ratio": ratio, "negatives_per_shard": head.num_sampled(rows // mesh.size, ratio),
        "argument_mib": mem.argument_size_in_bytes / 2**20,
        "output_mib": mem.output_size_in_bytes / 2**20,
        "temp_mib": mem.temp_size_in_bytes / 2**20,
        "per_device_mib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes) / 2**20,
        "compile_s": compile_s, "step_s_median": sorted(times)[len(times) // 2],
        "step_s_min": min(times),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="1000000", help="comma-separated K values")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--labels", type=int, default=8, help="l, labels per sample")
    parser.add_argument("--ratios", default="0.1", help="comma-separated sample ratios r")
    parser.add_argument("--devices", default="1,8", help="comma-separated device counts")
    parser.add_argument("--chunk", type=int, default=None,
                        help="classes scored at a time per shard (default: the head's automatic)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default="bench/results/head.json")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (K = 1,000 and the "
                        "ratios asked, D = 16, B = 16, devices 1 and 2, one step): seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.classes, args.dim, args.batch, args.devices, args.steps = "1000", 16, 16, "1,2", 1

    all_devices = jax.devices()
    counts = [int(n) for n in args.devices.split(",")]
    if max(counts) > len(all_devices):
        parser.error(f"--devices asks for {max(counts)} but only {len(all_devices)} exist")
    size = 256 if args.smoke else 2048
    probe_before = probe.xla_matmul_flops(n=size) / 1e9
    rows = []
    cases = [(int(k), n, float(r)) for k in args.classes.split(",") for r in args.ratios.split(",")
             for n in counts]
    for i, (k, n, ratio) in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] K={k:,} devices={n} r={ratio} ...", flush=True)
        rows.append(run_case(all_devices[:n], classes=k, dim=args.dim, batch=args.batch,
                             labels=args.labels, ratio=ratio, steps=args.steps, chunk=args.chunk))
    probe_after = probe.xla_matmul_flops(n=size) / 1e9

    print(f"\nD={args.dim} B={args.batch} l={args.labels} on "
          f"{all_devices[0].platform} (simulated devices share the host)")
    print(f"float32 matmul probe: {probe_before:.0f} GFLOP/s before, {probe_after:.0f} after")
    header = (f"{'K':>9} {'dev':>4} {'r':>5} {'neg/shard':>9} {'args MiB':>9} {'out MiB':>8} "
              f"{'temp MiB':>9} {'total MiB':>10} {'x 1-dev/n':>9} {'step s':>7} {'x r=1':>6}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        same = lambda r, **kw: all(r[k] == row[k] for k in ("classes", "devices", "ratio")
                                   if k not in kw) and all(r[k] == v for k, v in kw.items())
        single = next((r for r in rows if same(r, devices=1)), None)
        full = next((r for r in rows if same(r, ratio=1.0)), None)
        row["vs_single_over_n"] = (row["per_device_mib"]
                                   / (single["per_device_mib"] / row["devices"])
                                   if single else None)
        row["time_vs_r1"] = row["step_s_median"] / full["step_s_median"] if full else None
        ratio = f"{row['vs_single_over_n']:.3f}" if single else "-"
        vs_r1 = f"{row['time_vs_r1']:.2f}" if full else "-"
        print(f"{row['classes']:>9,} {row['devices']:>4} {row['ratio']:>5} "
              f"{row['negatives_per_shard']:>9} {row['argument_mib']:>9.1f} "
              f"{row['output_mib']:>8.1f} {row['temp_mib']:>9.1f} {row['per_device_mib']:>10.1f} "
              f"{ratio:>9} {row['step_s_median']:>7.3f} {vs_r1:>6}")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "platform": all_devices[0].platform,
                               "matmul_gflops_before": probe_before,
                               "matmul_gflops_after": probe_after, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
