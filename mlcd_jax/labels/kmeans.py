"""Spherical k-means on a sample of the embeddings, read shard by shard: faiss on the CPU, or Lloyd
iterations on the device mesh (`labels/jax_backend.py`, backend "jax").

The sample is `points_per_center × K` rows drawn uniformly over all shards (only those rows are
read; each process of a job reads its own share). `two_level=P` clusters P disjoint parts of the
sample into K centers each, reading each part only when it is clustered (memory: one part), then
clusters the P·K centers into K, as the authors did at LAION scale.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
from tqdm import tqdm

from mlcd_jax.labels import store
from mlcd_jax.runtime.errors import UserError

# faiss ClusteringParameters.init_method: random (faiss's default, O(k·d)), k-means++ (O(n·k·d),
# better seeds, small K only), AFK-MC² (an O(n·d + m·k²·d) approximation of k-means++)
INITS = {"random": 0, "kmeans++": 1, "afkmc2": 2}
# faiss warns, for every clustering, when it has fewer points per center than this; `fit` says it
# once instead (a small dataset, or the parts of --two_level).
FAISS_MIN_POINTS_PER_CENTER = 39


def sample_rows(total: int, size: int, seed: int, part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The sample's row numbers, sorted: `size` of `total` drawn without replacement; with
    `part` = (i, n), only the i-th of n consecutive parts of them (each process its own)."""
    size = min(size, total)
    rows = np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
    return np.array_split(rows, part[1])[part[0]]


def read_rows(shards: store.EmbeddingShards, rows: np.ndarray, desc: str = "kmeans: reading "
              "sample") -> np.ndarray:
    """Embeddings of the sorted `rows`, L2-normalised float32, read shard by shard (only those
    rows; a shard wholly in them sequentially)."""
    offsets, out, done = shards.offsets(), np.empty((len(rows), shards.dim), np.float32), 0
    for i in tqdm(range(len(shards.files)), desc=desc, unit="shard"):
        lo, hi = np.searchsorted(rows, [offsets[i], offsets[i + 1]])
        if hi > lo:
            shard = shards.load(i)
            # Each piece is converted to float32 and normalised in place, fresh in memory.
            piece = out[done:done + hi - lo]
            piece[:] = shard if hi - lo == len(shard) else shard[rows[lo:hi] - offsets[i]]
            store.normalize_in_place(piece)
            done += hi - lo
    return out


def sample(shards: store.EmbeddingShards, size: int, seed: int, part: tuple[int, int] = (0, 1)
           ) -> np.ndarray:
    """`size` rows drawn without replacement over all shards, L2-normalised float32; with
    `part` = (i, n), only the i-th of n consecutive parts of them (each process reads its own)."""
    return read_rows(shards, sample_rows(shards.total, size, seed, part))


def spherical_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, init: str = "random",
                     nredo: int = 1, verbose: bool = True, backend: str = "faiss",
                     jax_dtype: str = "auto"):
    """Centers (k × D, normalised) of x (normalised rows). jax: x is this process's share of the
    points (every process of the job calls this); the best of nredo runs by objective."""
    if k < 1:
        raise UserError(f"kmeans: --num_centers must be ≥ 1, got {k}")
    if init not in INITS:
        raise UserError(f"kmeans --init must be one of {list(INITS)}, got {init!r}")
    if backend == "jax":
        from mlcd_jax.labels import jax_backend  # the jax backend: jax only where it is used
        runs = [jax_backend.spherical_kmeans(x, k, niter=niter, seed=seed + r, init=init,
                                             dtype=jax_dtype, verbose=verbose)
                for r in range(nredo)]
        return max(runs, key=lambda run: run[1][-1] if run[1] else 0.0)[0]
    if len(x) < k:
        raise UserError(f"kmeans: {len(x)} points cannot make K = {k} centers; lower "
                        "--num_centers or raise --points_per_center")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, verbose=verbose,
                      nredo=nredo, max_points_per_centroid=max(1, -(-len(x) // k)),
                      min_points_per_centroid=1)  # its warning: said once, by `fit`
    km.cp.init_method = INITS[init]
    km.train(x)
    return store.normalize(km.centroids)


def fit(shards: store.EmbeddingShards, num_centers: int, *, points_per_center: int = 256,
        niter: int = 20, two_level: int = 1, seed: int = 0, init: str = "random",
        nredo: int = 1, verbose: bool = True, backend: str = "faiss",
        jax_dtype: str = "auto") -> tuple[np.ndarray, dict]:
    """(centers K × D float32, stats) for the embedding shards. faiss: this process reads the
    whole sample; jax: every process of the job reads only its share of it."""
    if num_centers > shards.total:
        raise UserError(f"kmeans: --num_centers {num_centers:,} is more than the "
                        f"{shards.total:,} embeddings in {shards.directory}; K must be at most N")
    size = min(num_centers * points_per_center, shards.total)
    share = (0, 1)
    if backend == "jax":
        import jax
        share = (jax.process_index(), jax.process_count())
    rows = sample_rows(shards.total, size, seed, part=share)
    fewest = size // max(two_level, 1) // num_centers  # points per center in a clustering
    if backend == "faiss" and fewest < FAISS_MIN_POINTS_PER_CENTER:
        print(f"kmeans: about {fewest} point{'s' * (fewest != 1)} per center"
              + (f" in each of the {two_level} parts" if two_level > 1 else "")
              + f" (faiss asks for {FAISS_MIN_POINTS_PER_CENTER}): the centers are noisier; fewer "
              "--num_centers" + (" or --two_level" if two_level > 1 else "") + " gives each more",
              flush=True)
    cluster = lambda x, seed: spherical_kmeans(x, num_centers, niter=niter, seed=seed, init=init,
                                               nredo=nredo, verbose=verbose, backend=backend,
                                               jax_dtype=jax_dtype)
    t = time.perf_counter()
    if two_level > 1:
        # Level 1: P parts of the sample (seeded, over its global positions), K centers each;
        # each process clusters its rows of each part, read when that part's turn comes, so
        # memory holds one part (and the P·K centers), not the sample.
        first = sum(len(p) for p in np.array_split(np.arange(size), share[1])[:share[0]])
        positions = first + np.arange(len(rows))
        part_of = np.empty(size, np.int32)
        for i, p in enumerate(np.array_split(np.random.default_rng(seed + 1).permutation(size),
                                             two_level)):
            part_of[p] = i
        mine = part_of[positions]
        del part_of, positions
        firsts = [cluster(read_rows(shards, rows[mine == i], f"kmeans: reading part {i + 1}"),
                          seed + i)
                  for i in tqdm(range(two_level), desc="kmeans: level 1", unit="part")]
        # Level 2: the P·K centers (the same on every process), each process feeding its share.
        x = np.array_split(np.concatenate(firsts), share[1])[share[0]]
    else:
        x = read_rows(shards, rows)
    centers = cluster(x, seed)
    seconds = time.perf_counter() - t
    return centers, {"sample": size, "niter": niter, "nredo": nredo, "init": init,
                     "backend": backend, "two_level": two_level, "seconds": seconds,
                     "points_per_s_per_iter": size * niter * nredo / seconds}
