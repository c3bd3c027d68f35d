"""Label pipeline throughput, each backend side by side with faiss called directly, on synthetic
embeddings.

    .venv/bin/python bench/labels.py                                  # N = 1M, D = 512, K = 10k
    .venv/bin/python bench/labels.py --centers 100000 --niter 1
    python bench/labels.py --points 10000000 --centers 100000,1000000 --backends jax  # GPU
    .venv/bin/python bench/labels.py --smoke --json /tmp/l.json  # every row at toy size (tests)

Writes N clustered float16 embeddings as shards, then for each K times one `kmeans.fit` (on all N
points: points_per_center is set so the sample is N) and one `assign.run` with each backend
(`--backends`: faiss, jax), and (with faiss) faiss.Kmeans / index.search on the same array, in
alternating rounds (each row's fastest counts). Points/s and achieved TFLOP/s (2·N·K·D per
k-means iteration or assign pass) against matmul probes of the same run: float32 numpy (faiss's
BLAS) and XLA (the jax backend's dtype), before and after. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.runtime import backend  # noqa: E402, I001

backend.choose()  # before jax starts: the platform, quietly (as every command)

import faiss  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import probe  # noqa: E402  (bench/probe.py)

from mlcd_jax.labels import assign, jax_backend, kmeans, store  # noqa: E402


def numpy_gflops(n=2048, reps=5):
    a = np.ones((n, n), np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--centers", default="10000", help="K, comma-separated")
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--niter", type=int, default=2)
    p.add_argument("--index", default="flat", choices=["flat", "ivf"])
    p.add_argument("--backends", default="faiss,jax")
    p.add_argument("--shard", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds alternating the rows; each row's fastest counts")
    p.add_argument("--json", default="bench/results/labels.json")
    p.add_argument("--smoke", action="store_true", help="the same rows at toy size (N = 2,000, "
                   "D = 16, each K / 10,000, one round, one iteration): seconds, for the tests")
    a = p.parse_args(argv)
    if a.smoke:
        a.points, a.dim, a.shard, a.rounds, a.niter = 2_000, 16, 1_000, 1, 1
        a.centers = ",".join(str(max(int(k) // 10_000, 8)) for k in a.centers.split(","))
    backends = a.backends.split(",")
    dtype = jax_backend.compute_dtype()
    size = 256 if a.smoke else 2048 if jax.default_backend() == "cpu" else 8192
    xla_gflops = lambda: probe.xla_matmul_flops(dtype, n=size) / 1e9
    probes = {"numpy float32": [numpy_gflops(size)], f"XLA {dtype.name}": [xla_gflops()]}
    rng = np.random.default_rng(0)
    rows = []
    for k in [int(c) for c in a.centers.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            means = rng.normal(size=(k, a.dim)).astype(np.float32)
            shards = []
            for s in range(0, a.points, a.shard):  # clustered data, generated shard by shard
                n = min(a.shard, a.points - s)
                shards.append(means[rng.integers(0, k, n)]
                              + rng.standard_normal((n, a.dim), dtype=np.float32))
            emb = store.write_embeddings(tmp / "emb", shards, model="bench")
            del shards
            x = store.normalize(np.concatenate([emb.load(i) for i in range(len(emb.files))]))
            ppc = -(-a.points // k)

            def faiss_kmeans():
                km = faiss.Kmeans(a.dim, k, niter=a.niter, spherical=True, seed=0,
                                  max_points_per_centroid=ppc)
                km.train(x)
                return km.centroids

            times = {}
            add = lambda name, t: times.setdefault(name, []).append(t)
            for r in range(a.rounds):
                for backend in backends:
                    (centers, _), t = timed(lambda: kmeans.fit(
                        emb, k, points_per_center=ppc, niter=a.niter, seed=0, backend=backend,
                        verbose=False))
                    add(("kmeans", f"ours, {backend}"), t)
                    np.save(tmp / "centers.npy", centers)
                    _, t = timed(lambda: assign.run(
                        tmp / "emb", tmp / "centers.npy", tmp / f"lab_{backend}_{r}",
                        num_labels=a.labels, index_kind=a.index, recall_sample=2_000,
                        backend=backend))
                    add(("assign", f"ours, {backend}"), t)
                if "faiss" in backends:  # and faiss called directly, our overhead's yardstick
                    add(("kmeans", "faiss directly"), timed(faiss_kmeans)[1])
                    index, _ = assign.build_index(np.load(tmp / "centers.npy"), a.index)
                    add(("assign", "faiss directly"),
                        timed(lambda: [index.search(x[s:s + 65_536], a.labels)
                                       for s in range(0, len(x), 65_536)])[1])
                print(f"K = {k:,}, round {r + 1}/{a.rounds}: " + ", ".join(
                    f"{step} {name} {t[-1]:.1f} s" for (step, name), t in times.items()),
                    flush=True)
            for (step, name), t in times.items():
                passes = a.niter if step == "kmeans" else 1
                seconds = min(t)
                rows.append({"K": k, "step": step, "row": name, "seconds": seconds,
                             "points_per_s": a.points * passes / seconds,
                             "tflops": 2.0 * a.points * k * a.dim * passes / seconds / 1e12})
    probes["numpy float32"].append(numpy_gflops(size))
    probes[f"XLA {dtype.name}"].append(xla_gflops())
    device = jax.devices()[0]
    print(f"\nN={a.points:,} D={a.dim} l={a.labels}; kmeans {a.niter} iterations; "
          f"{len(jax.devices())} {device.device_kind} devices; matmul probes (GFLOP/s, before / "
          "after): " + "; ".join(f"{n} {v[0]:,.0f} / {v[1]:,.0f}" for n, v in probes.items()))
    best = {n: max(v) for n, v in probes.items()}
    print(f"{'K':>9} {'step':<7} {'row':<16} {'seconds':>8} {'points/s':>12} {'TFLOP/s':>8} "
          + " ".join(f"{'of ' + n:>18}" for n in best))
    for r in rows:
        r["of_probe"] = {n: r["tflops"] * 1e3 / v for n, v in best.items()}
        print(f"{r['K']:>9,} {r['step']:<7} {r['row']:<16} {r['seconds']:>8.2f} "
              f"{r['points_per_s']:>12,.0f} {r['tflops']:>8.3f} "
              + " ".join(f"{v:>18.0%}" for v in r["of_probe"].values()))
    out = pathlib.Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "device": str(device), "probes_gflops": probes,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
