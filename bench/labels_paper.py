"""The label stage at the paper's shapes: K = 1,000,000 centers of width 768 (LAION-400M, CLIP
ViT-L/14 embeddings) sharded over 8 simulated CPU devices, against a streamed sample.

    .venv/bin/python bench/labels_paper.py                  # K = 1M, D = 768, 8 devices
    .venv/bin/python bench/labels_paper.py --centers 100000 --blocks 2
    .venv/bin/python bench/labels_paper.py --smoke --out /tmp/lp.json   # toy size (the tests)

For the jax backend's two programs (exact top-8 of a block of rows, `jax_backend.top_l`; one Lloyd
accumulation step, `jax_backend._accumulate`), compiled for the mesh: each device's memory from the
compiled program (arguments, outputs, temporaries: XLA's own figures, not a guess), then the time
of a few blocks (rows_per_device rows per device, the default 4,096 unless --rows says otherwise)
fed from float16 rows as `labels assign` / `kmeans` feed them. Prints a table and writes JSON;
the LAION table of docs/labels.md is recomputed from the rate measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.runtime import backend  # noqa: E402, I001

backend.choose()  # before jax starts: the platform, quietly (as every command)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import probe  # noqa: E402  (bench/probe.py)

from mlcd_jax.labels import jax_backend  # noqa: E402


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arguments_mib": m.argument_size_in_bytes / 2**20,
            "outputs_mib": m.output_size_in_bytes / 2**20,
            "temporaries_mib": m.temp_size_in_bytes / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--centers", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--rows", type=int, default=256, help="rows per device per block (assign and "
                   "kmeans use 4,096; fewer keep this CPU's timing short: the FLOPs per row are "
                   "the same)")
    p.add_argument("--blocks", type=int, default=2, help="blocks timed (after one to compile)")
    p.add_argument("--dtype", default="float32", help="the scored inputs' dtype (auto: float32 "
                   "on CPU, float16 on GPUs)")
    p.add_argument("--out", default="bench/results/labels_paper.json")
    p.add_argument("--smoke", action="store_true", help="K = 1,000, D = 16, 8 rows per device, "
                   "one block: seconds, for the tests")
    a = p.parse_args(argv)
    if a.smoke:
        a.centers, a.dim, a.rows, a.blocks = 1_000, 16, 8, 1
    probe_n = 256 if a.smoke else 2048
    mesh = jax_backend.label_mesh()
    dtype = jax_backend.compute_dtype(a.dtype)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    raw = rng.standard_normal((a.centers, a.dim), dtype=np.float32)
    centers = jax_backend.shard_centers(raw, mesh, dtype)
    del raw
    made = time.perf_counter() - t
    blocks = jax_backend.Blocks(mesh, a.rows)
    x = rng.standard_normal((blocks.per_process * (a.blocks + 1), a.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    block, weight, _ = blocks.block(x, 0, dtype)
    k_pad, d = centers.shape
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(jax_backend.AXIS))
    totals = (jax.device_put(np.zeros((k_pad, d), np.float32), split),
              jax.device_put(np.zeros((k_pad,), np.float32), split), np.float32(0))

    result = {"centers": a.centers, "dim": a.dim, "labels": a.labels, "devices": mesh.size,
              "rows_per_device": a.rows, "dtype": str(dtype), "centers_made_s": made,
              "centers_per_device_mib": centers.addressable_shards[0].data.nbytes / 2**20}
    probe_before = probe.xla_matmul_flops(n=probe_n) / 1e9
    for name, fn, args, kw in (
            ("assign top-l", jax_backend.top_l, (block, centers),
             dict(mesh=mesh, num_classes=a.centers, l=a.labels)),
            ("kmeans step", jax_backend._accumulate, (totals, block, weight, centers),
             dict(mesh=mesh, num_classes=a.centers))):
        t = time.perf_counter()
        compiled = fn.lower(*args, **kw).compile()
        compile_s = time.perf_counter() - t
        mem = memory(compiled)
        times = []
        for i in range(a.blocks + 1):  # block 0 warms up
            b, w, _ = blocks.block(x, i, dtype)
            t = time.perf_counter()
            if name == "assign top-l":
                out = compiled(b, centers)
            else:  # the sums are donated: each step takes the last one's
                out = compiled(totals if i == 0 else out, b, w, centers)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
        seconds = float(np.median(times[1:]))
        rows = blocks.per_process
        flop = 2.0 * rows * a.centers * a.dim
        result[name] = {**mem, "compile_s": compile_s, "seconds_per_block": seconds,
                        "rows_per_block": rows, "points_per_s": rows / seconds,
                        "tflops": flop / seconds / 1e12}
        print(f"{name}: per device arguments {mem['arguments_mib']:.1f} MiB, outputs "
              f"{mem['outputs_mib']:.1f} MiB, temporaries {mem['temporaries_mib']:.1f} MiB; "
              f"{rows:,} rows in {seconds:.2f} s = {rows / seconds:,.0f} points/s, "
              f"{flop / seconds / 1e12:.3f} TFLOP/s (compile {compile_s:.1f} s)", flush=True)
    result["xla_matmul_gflops_before_after"] = [probe_before,
                                                probe.xla_matmul_flops(n=probe_n) / 1e9]
    print(f"XLA float32 matmul probe: {probe_before:.0f} / "
          f"{result['xla_matmul_gflops_before_after'][1]:.0f} GFLOP/s before / after")
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"centers: {result['centers_per_device_mib']:.0f} MiB per device ({dtype}); wrote "
          f"{a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
