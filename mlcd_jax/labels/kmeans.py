"""Spherical k-means on a sample of the embeddings, read shard by shard: faiss on the CPU, or Lloyd
iterations on the device mesh (`labels/sharded.py`, backend "jax").

The sample is `points_per_center × K` rows drawn uniformly over all shards (only those rows are
read). `two_level=P` clusters P disjoint parts of the sample into K centers each, then clusters the
P·K centers into K, as the authors did at LAION scale.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
from tqdm import tqdm

from mlcd_jax.labels import sharded, store

# faiss ClusteringParameters.init_method: random (faiss's default, O(k·d)), k-means++ (O(n·k·d),
# better seeds, small K only), AFK-MC² (an O(n·d + m·k²·d) approximation of k-means++)
INITS = {"random": 0, "kmeans++": 1, "afkmc2": 2}


def sample(shards: store.EmbeddingShards, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn without replacement over all shards, L2-normalised float32."""
    size = min(size, shards.total)
    rows = np.sort(np.random.default_rng(seed).choice(shards.total, size, replace=False))
    offsets, out, done = shards.offsets(), np.empty((size, shards.dim), np.float32), 0
    for i in tqdm(range(len(shards.files)), desc="kmeans: reading sample", unit="shard"):
        lo, hi = np.searchsorted(rows, [offsets[i], offsets[i + 1]])
        if hi > lo:
            shard = shards.load(i)
            # A shard wholly in the sample is read sequentially, not row by row; each part is
            # converted to float32 and normalised in place, while it is fresh in memory.
            part = out[done:done + hi - lo]
            part[:] = shard if hi - lo == len(shard) else shard[rows[lo:hi] - offsets[i]]
            store.normalize_in_place(part)
            done += hi - lo
    return out


def spherical_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, init: str = "random",
                     nredo: int = 1, verbose: bool = True, backend: str = "faiss",
                     jax_dtype: str = "auto"):
    if len(x) < k:
        raise ValueError(f"kmeans: {len(x)} points cannot make K = {k} centers; lower "
                         "--num_centers or raise --points_per_center")
    if k < 1:
        raise ValueError(f"kmeans: --num_centers must be ≥ 1, got {k}")
    if init not in INITS:
        raise ValueError(f"kmeans --init must be one of {list(INITS)}, got {init!r}")
    if backend == "jax":  # the best of nredo runs by objective, as faiss
        runs = [sharded.spherical_kmeans(x, k, niter=niter, seed=seed + r, init=init,
                                         dtype=jax_dtype, verbose=verbose)
                for r in range(nredo)]
        return max(runs, key=lambda run: run[1][-1] if run[1] else 0.0)[0]
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, verbose=verbose,
                      nredo=nredo, max_points_per_centroid=max(1, -(-len(x) // k)))
    km.cp.init_method = INITS[init]
    km.train(x)
    return store.normalize(km.centroids)


def fit(shards: store.EmbeddingShards, num_centers: int, *, points_per_center: int = 256,
        niter: int = 20, two_level: int = 1, seed: int = 0, init: str = "random",
        nredo: int = 1, verbose: bool = True, backend: str = "faiss",
        jax_dtype: str = "auto") -> tuple[np.ndarray, dict]:
    """(centers K × D float32, stats) for the embedding shards."""
    if num_centers > shards.total:
        raise ValueError(f"kmeans: --num_centers {num_centers:,} is more than the "
                         f"{shards.total:,} embeddings in {shards.directory}; K must be at most N")
    x = sample(shards, num_centers * points_per_center, seed)
    sample_size = len(x)
    t = time.perf_counter()
    if two_level > 1:
        parts = np.array_split(np.random.default_rng(seed + 1).permutation(len(x)), two_level)
        firsts = [spherical_kmeans(x[p], num_centers, niter=niter, seed=seed + i, init=init,
                                   nredo=nredo, verbose=verbose, backend=backend,
                                   jax_dtype=jax_dtype)
                  for i, p in enumerate(tqdm(parts, desc="kmeans: level 1", unit="part"))]
        x = np.concatenate(firsts)
    centers = spherical_kmeans(x, num_centers, niter=niter, seed=seed, init=init, nredo=nredo,
                               verbose=verbose, backend=backend, jax_dtype=jax_dtype)
    seconds = time.perf_counter() - t
    return centers, {"sample": sample_size, "niter": niter, "nredo": nredo, "init": init,
                     "backend": backend,
                     "two_level": two_level, "seconds": seconds,
                     "points_per_s_per_iter": sample_size * niter * nredo / seconds}
