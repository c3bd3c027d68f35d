"""Label pipeline throughput next to faiss called directly (our overhead), on synthetic embeddings.

    .venv/bin/python bench/labels.py                                  # N = 1M, D = 512, K = 10k
    .venv/bin/python bench/labels.py --centers 100000 --niter 1 --index ivf

Writes N clustered float16 embeddings as shards, then times one `kmeans.fit` (on all N points:
points_per_center is set so the sample is N) against faiss.Kmeans on the same array, and
`assign.run` against index.search on the same array, in alternating rounds (each side's fastest
counts). Points/s; a float32 matmul probe before and after shows the machine's state (DESIGN.md:
compare only within one run). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import faiss
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.labels import assign, kmeans, store  # noqa: E402


def matmul_gflops(n=2048, reps=5):
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
    p.add_argument("--centers", type=int, default=10_000)
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--niter", type=int, default=2)
    p.add_argument("--index", default="flat", choices=["flat", "ivf"])
    p.add_argument("--shard", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds alternating ours and faiss; each side's fastest counts")
    p.add_argument("--json", default="bench/results/labels.json")
    a = p.parse_args(argv)

    probe_before = matmul_gflops()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        means = rng.normal(size=(a.centers, a.dim)).astype(np.float32)
        shards = []
        for s in range(0, a.points, a.shard):  # clustered data, generated shard by shard
            n = min(a.shard, a.points - s)
            shards.append(means[rng.integers(0, a.centers, n)]
                          + rng.standard_normal((n, a.dim), dtype=np.float32))
        emb = store.write_embeddings(tmp / "emb", shards, model="bench")
        del shards
        x = store.normalize(np.concatenate([emb.load(i) for i in range(len(emb.files))]))

        ppc = -(-a.points // a.centers)

        def faiss_kmeans():
            km = faiss.Kmeans(a.dim, a.centers, niter=a.niter, spherical=True, seed=0,
                              max_points_per_centroid=ppc)
            km.train(x)
            return km.centroids

        # Rounds alternate ours and faiss, each side's fastest counts: a drift of this machine's
        # speed (DESIGN.md) then hits both alike.
        ours_km, faiss_km, ours_assign, faiss_assign = [], [], [], []
        for r in range(a.rounds):
            (ours_centers, _), t = timed(lambda: kmeans.fit(
                emb, a.centers, points_per_center=ppc, niter=a.niter, seed=0))
            ours_km.append(t)
            faiss_km.append(timed(faiss_kmeans)[1])
            np.save(tmp / "centers.npy", ours_centers)
            result, t = timed(lambda: assign.run(
                tmp / "emb", tmp / "centers.npy", tmp / f"lab{r}", num_labels=a.labels,
                index_kind=a.index, recall_sample=2_000))
            ours_assign.append(t)
            index, _ = assign.build_index(ours_centers, a.index)
            faiss_assign.append(timed(lambda: [index.search(x[s:s + 65_536], a.labels)
                                               for s in range(0, len(x), 65_536)])[1])
            print(f"round {r + 1}/{a.rounds}: k-means ours {ours_km[-1]:.1f} s, faiss "
                  f"{faiss_km[-1]:.1f} s; assign ours {ours_assign[-1]:.1f} s, faiss "
                  f"{faiss_assign[-1]:.1f} s", flush=True)
        ours_km, faiss_km = min(ours_km), min(faiss_km)
        ours_assign, faiss_assign = min(ours_assign), min(faiss_assign)
    probe_after = matmul_gflops()

    rows = {
        "kmeans": {"ours_points_per_s": a.points * a.niter / ours_km,
                   "faiss_points_per_s": a.points * a.niter / faiss_km, "ours_s": ours_km,
                   "faiss_s": faiss_km},
        "assign": {"ours_points_per_s": a.points / ours_assign,
                   "faiss_points_per_s": a.points / faiss_assign, "ours_s": ours_assign,
                   "faiss_s": faiss_assign, "index": a.index,
                   "recall_at_l": result.get("recall_at_l", 1.0)},
    }
    print(f"\nN={a.points:,} D={a.dim} K={a.centers:,} l={a.labels}; kmeans {a.niter} iterations; "
          f"matmul probe {probe_before:.0f} / {probe_after:.0f} GFLOP/s before / after")
    print(f"{'step':<8} {'ours pt/s':>12} {'faiss pt/s':>12} {'ours/faiss time':>16}")
    for name, r in rows.items():
        print(f"{name:<8} {r['ours_points_per_s']:>12,.0f} {r['faiss_points_per_s']:>12,.0f} "
              f"{r['ours_s'] / r['faiss_s']:>16.3f}")
    out = pathlib.Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "matmul_gflops_before": probe_before,
                               "matmul_gflops_after": probe_after, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
