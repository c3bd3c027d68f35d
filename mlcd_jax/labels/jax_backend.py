"""Exact top-l search and spherical k-means on the device mesh: the `jax` backend of `labels`.

The K centers are split along K over every device of every process, as the head's (K_local =
ceil(K / n) rows each, zero padding at the end that is never a result). A block of embeddings is
split by rows over the devices, each process supplying its own rows; inside one jitted `shard_map`
every device all-gathers the block (B × D is small), scores it against its own centers a chunk at a
time (bf16/fp16 inputs on accelerators, float32 accumulation), keeps a running top-l per row, and
the devices merge their candidates: each row ends with l ids, and no B × K scores are ever held.
A Lloyd iteration scores the same way (top-1) and each device sums the rows that chose one of its
own centers, so sums and counts never leave the device that owns the center.

`tests/labels/test_jax_backend.py` checks both against float64 numpy on 1, 2, 4 and 8 devices.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mlcd_jax.runtime import backend as platform, mesh as mesh_lib
from mlcd_jax.runtime.errors import UserError

AXIS = "devices"
SCORES_PER_CHUNK = 1 << 24  # B × chunk scores at a time (64 MiB in float32)


def label_mesh(devices=None) -> jax.sharding.Mesh:
    """One axis over every device of every process (each device: some rows, some centers)."""
    return mesh_lib.make_mesh([(AXIS, -1)], devices)


def compute_dtype(name: str = "auto"):
    """The dtype of the scored inputs: "auto" is float16 on GPUs (their matmul peak, and 8 × bf16's
    precision for cosines in [-1, 1]), bfloat16 on TPUs (their native half type), float32 on CPUs
    (whose half-precision matmuls are slower)."""
    return jnp.dtype(platform.labels_dtype(name))


def shard_centers(centers: np.ndarray, mesh, dtype) -> jax.Array:
    """(n · K_local, D) normalised centers in `dtype`, split along K over the mesh."""
    k, d = centers.shape
    padded = mesh_lib.padded_num_classes(k, mesh.size)
    sharding = NamedSharding(mesh, P(AXIS, None))
    centers = np.asarray(centers, np.float32)
    norms = np.linalg.norm(centers, axis=1, keepdims=True)
    centers = centers / np.maximum(norms, 1e-12)

    def piece(index):
        start, stop, _ = index[0].indices(padded)
        rows = np.zeros((stop - start, d), np.float32)
        real = centers[start:min(stop, k)]
        rows[:len(real)] = real
        return rows.astype(dtype)

    return jax.make_array_from_callback((padded, d), sharding, piece)


def _chunks(num_local: int, batch: int) -> int:
    """Center chunk size: B × chunk ≤ SCORES_PER_CHUNK, dividing K_local evenly enough."""
    chunk = max(1, min(num_local, SCORES_PER_CHUNK // max(batch, 1)))
    return -(-num_local // -(-num_local // chunk))


def _local_top(x, centers, offset, num_classes, l):
    """(B, l) best scores and global ids of this device's centers, a chunk at a time."""
    num_local = centers.shape[0]
    chunk = _chunks(num_local, x.shape[0])
    num_chunks = -(-num_local // chunk)
    padded = jnp.pad(centers, ((0, num_chunks * chunk - num_local), (0, 0)))
    # The carry is device-varying (each device has its own centers), typed so from the start.
    init = jax.lax.pcast((jnp.full((x.shape[0], l), -jnp.inf, jnp.float32),
                          jnp.full((x.shape[0], l), -1, jnp.int32)), AXIS, to="varying")

    def step(c, best):
        rows = jax.lax.dynamic_slice_in_dim(padded, c * chunk, chunk)
        scores = jnp.matmul(x, rows.T, preferred_element_type=jnp.float32)     # (B, chunk)
        ids = offset + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        real = (c * chunk + jnp.arange(chunk) < num_local) & (ids < num_classes)
        scores = jnp.where(real[None, :], scores, -jnp.inf)
        k = min(l, chunk)
        top, where = jax.lax.top_k(scores, k)
        merged = jnp.concatenate([best[0], top], 1)
        merged_ids = jnp.concatenate([best[1], ids[where]], 1)
        keep, pick = jax.lax.top_k(merged, l)  # ties: the earlier (lower id) first
        return keep, jnp.take_along_axis(merged_ids, pick, 1)

    return jax.lax.fori_loop(0, num_chunks, step, init)


def _merge(values, ids, l):
    """Across devices: every device's (B, l) candidates → the global top-l, (B, l)."""
    n = jax.lax.axis_size(AXIS)
    values = jax.lax.all_gather(values, AXIS, to="invarying")        # (n, B, l)
    ids = jax.lax.all_gather(ids, AXIS, to="invarying")
    b = values.shape[1]
    values = values.transpose(1, 0, 2).reshape(b, n * l)               # device order = id order
    ids = ids.transpose(1, 0, 2).reshape(b, n * l)
    top, pick = jax.lax.top_k(values, l)
    return top, jnp.take_along_axis(ids, pick, 1)


def _mine(a, rows):
    """This device's `rows` rows of a (B, ...) array that every device holds."""
    return jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(AXIS) * rows, rows)


def _offset(centers):
    return jax.lax.axis_index(AXIS) * centers.shape[0]


@functools.partial(jax.jit, static_argnames=("mesh", "num_classes", "l"))
def top_l(x, centers, *, mesh, num_classes: int, l: int):
    """(scores, ids) (B, l) of the l most similar centers of each row of x (B, D), rows split over
    the mesh; both outputs split by rows as x."""

    def body(x, centers):
        rows = x.shape[0]
        block = jax.lax.all_gather(x, AXIS, tiled=True, to="invarying")
        values, ids = _local_top(block.astype(centers.dtype), centers, _offset(centers),
                                 num_classes, l)
        values, ids = _merge(values, ids, l)
        return _mine(values, rows), _mine(ids, rows)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P(AXIS)),
                         out_specs=(P(AXIS), P(AXIS)))(x, centers)


@functools.partial(jax.jit, static_argnames=("mesh", "num_classes"), donate_argnums=(0,))
def _accumulate(totals, x, weight, centers, *, mesh, num_classes: int):
    """Add one block to (sums (K_pad, D), counts (K_pad,), objective): each row's nearest center,
    its weight and cosine. Sums and counts stay on the device that owns the center."""

    def body(totals, x, weight, centers):
        sums, counts, objective = totals
        block = jax.lax.all_gather(x, AXIS, tiled=True, to="invarying")
        weight = jax.lax.all_gather(weight, AXIS, tiled=True, to="invarying")
        value, best = _merge(*_local_top(block.astype(centers.dtype), centers, _offset(centers),
                                         num_classes, 1), 1)
        local = best[:, 0] - _offset(centers)
        mine = (local >= 0) & (local < centers.shape[0])
        slot = jnp.where(mine, local, centers.shape[0])  # rows of other devices: a dropped slot
        w = jnp.where(mine, weight, 0.0)
        sums = sums + jax.ops.segment_sum(block.astype(jnp.float32) * w[:, None], slot,
                                          num_segments=centers.shape[0] + 1)[:-1]
        counts = counts + jax.ops.segment_sum(w, slot, num_segments=centers.shape[0] + 1)[:-1]
        return sums, counts, objective + jnp.sum(weight * value[:, 0])

    return jax.shard_map(body, mesh=mesh,
                         in_specs=((P(AXIS), P(AXIS), P()), P(AXIS), P(AXIS), P(AXIS)),
                         out_specs=(P(AXIS), P(AXIS), P()))(totals, x, weight, centers)


class Blocks:
    """This process's rows (N_local × D) fed to the mesh in blocks of `rows_per_device` rows per
    device; every process makes the same number of calls (`count`), a process out of rows feeds
    zero-weight padding."""

    def __init__(self, mesh, rows_per_device: int):
        self.mesh, self.rows = mesh, rows_per_device
        self.per_process = rows_per_device * jax.local_device_count()
        self.sharding = NamedSharding(mesh, P(AXIS))

    def count(self, local_rows: int) -> int:
        mine = -(-local_rows // self.per_process)
        if jax.process_count() == 1:
            return mine
        return int(np.max(multihost_utils.process_allgather(np.int64(mine))))

    def block(self, x: np.ndarray, i: int, dtype) -> tuple[jax.Array, jax.Array, int]:
        """Block i of x as global (rows, weights) arrays, and the number of real rows in it."""
        part = x[i * self.per_process:(i + 1) * self.per_process]
        real = len(part)
        padded = np.zeros((self.per_process, x.shape[1]), dtype)
        padded[:real] = part
        weight = np.zeros(self.per_process, np.float32)
        weight[:real] = 1.0
        make = lambda a: jax.make_array_from_process_local_data(self.sharding, a)
        return make(padded), make(weight), real


class Searcher:
    """Exact top-l over the mesh for this process's rows (`search`), centers sharded once."""

    def __init__(self, centers: np.ndarray, num_labels: int, *, mesh=None, dtype="auto",
                 rows_per_device: int = 4096):
        self.mesh = mesh or label_mesh()
        self.dtype = compute_dtype(dtype)
        self.num_classes, self.l = len(centers), num_labels
        self.centers = shard_centers(centers, self.mesh, self.dtype)
        self.blocks = Blocks(self.mesh, rows_per_device)

    def search(self, x: np.ndarray, calls: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (len(x), l) for this process's rows x (normalised); `calls` blocks in all
        (default: as many as the process with the most rows needs; every process must make the
        same number)."""
        calls = self.blocks.count(len(x)) if calls is None else calls
        scores, ids = [], []
        for i in range(calls):
            block, _, real = self.blocks.block(x, i, self.dtype)
            s, j = top_l(block, self.centers, mesh=self.mesh, num_classes=self.num_classes,
                         l=self.l)
            s, j = (np.asarray(multihost_utils.global_array_to_host_local_array(a, self.mesh,
                                                                                P(AXIS)))
                    for a in (s, j))
            scores.append(s[:real])
            ids.append(j[:real])
        if not scores:
            return np.zeros((0, self.l), np.float32), np.zeros((0, self.l), np.int32)
        return np.concatenate(scores), np.concatenate(ids)


def lloyd(x: np.ndarray, centers: jax.Array, *, mesh, num_classes: int, blocks: Blocks, dtype):
    """One Lloyd step over this process's rows x: (sums (K_pad, D), counts (K_pad,), objective),
    sums and counts split along K as the centers."""
    k_pad, d = centers.shape
    split = NamedSharding(mesh, P(AXIS))
    totals = (jax.device_put(jnp.zeros((k_pad, d), jnp.float32), split),
              jax.device_put(jnp.zeros((k_pad,), jnp.float32), split),
              jnp.zeros((), jnp.float32))
    for i in range(blocks.count(len(x))):
        block, weight, _ = blocks.block(x, i, dtype)
        totals = _accumulate(totals, block, weight, centers, mesh=mesh, num_classes=num_classes)
    return totals


@functools.partial(jax.jit, static_argnames=("dtype",))
def _new_centers(sums, counts, old, *, dtype):
    """Normalised means; a center no row chose keeps its place (the caller re-seeds it)."""
    norms = jnp.linalg.norm(sums, axis=1, keepdims=True)
    fresh = sums / jnp.maximum(norms, 1e-12)
    return jnp.where((counts > 0)[:, None], fresh, old.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",), donate_argnums=(0,))
def _split(centers, empty, source, *, dtype):
    """Each empty center becomes a copy of a large one, the two nudged apart by ±1/1024 in
    alternating coordinates (faiss's split), both renormalised."""
    eps = 1.0 / 1024
    rows = centers[source].astype(jnp.float32)                              # (E, D)
    signs = jnp.where(jnp.arange(rows.shape[1]) % 2 == 0, 1.0, -1.0)
    up, down = rows * (1 + eps * signs), rows * (1 - eps * signs)
    norm = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    centers = centers.at[empty].set(norm(up).astype(dtype))
    return centers.at[source].set(norm(down).astype(dtype))


def reseed_sources(counts: np.ndarray, empty: np.ndarray,
                   rng) -> tuple[np.ndarray, np.ndarray]:
    """(empty clusters, clusters to split for them): distinct sources drawn with probability
    ∝ (size − 1) without replacement (Gumbel top-k, vectorised: thousands of empty clusters at
    K = 1M cost one pass over the sizes), so no cluster is split twice in an iteration or split
    into nothing. Where fewer clusters have points to give than are empty, the rest stay empty
    until the next iteration."""
    weights = np.maximum(counts.astype(np.float64) - 1, 0)
    eligible = np.flatnonzero(weights > 0)
    if not eligible.size:
        raise UserError("kmeans: every cluster has at most one point; lower --num_centers")
    take = min(len(empty), len(eligible))
    keys = np.log(weights[eligible]) + rng.gumbel(size=len(eligible))
    sources = eligible[np.argpartition(-keys, take - 1)[:take]]
    return np.asarray(empty)[:take], sources


def _process_counts(n: int) -> np.ndarray:
    """Rows each process holds (the same array on every process)."""
    if jax.process_count() == 1:
        return np.array([n])
    return np.asarray(multihost_utils.process_allgather(np.int64(n))).reshape(-1)


def gather_rows(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rows at global `positions` of the sample that the processes hold in order (this one: x),
    on every process."""
    counts = _process_counts(len(x))
    start = int(counts[:jax.process_index()].sum())
    held = (positions >= start) & (positions < start + len(x))
    out = np.zeros((len(positions), x.shape[1]), np.float32)
    out[held] = x[positions[held] - start]
    if jax.process_count() > 1:  # each row is held by exactly one process
        out = np.asarray(multihost_utils.process_allgather(out)).sum(axis=0)
    return out


def init_centers(x: np.ndarray, k: int, *, init: str, seed: int) -> np.ndarray:
    """Seeds from the sample (this process's rows x, in process order): "random" takes k distinct
    rows; "kmeans++" runs k-means++ (cosine distance) on a subsample of at most 16·k rows, one
    jitted loop (for K up to ~10^4: its k steps are sequential)."""
    if init not in ("random", "kmeans++"):
        raise UserError(f"kmeans --init for the jax backend must be random or kmeans++, got "
                        f"{init!r}")
    total = int(_process_counts(len(x)).sum())
    rng = np.random.default_rng(seed)
    if init == "random":
        return gather_rows(x, np.sort(rng.choice(total, k, replace=False)))
    sub = gather_rows(x, np.sort(rng.choice(total, min(total, 16 * k), replace=False)))
    return np.asarray(_kmeans_pp(jnp.asarray(sub), k, jax.random.key(seed)))


@functools.partial(jax.jit, static_argnames=("k",))
def _kmeans_pp(x, k, key):
    def step(i, carry):
        chosen, dist, key = carry
        key, pick = jax.random.split(key)
        j = jax.random.categorical(pick, jnp.log(jnp.maximum(dist, 1e-30)))
        chosen = chosen.at[i].set(x[j])
        return chosen, jnp.minimum(dist, jnp.maximum(1.0 - x @ x[j], 0.0)), key

    chosen = jnp.zeros((k, x.shape[1]), x.dtype)
    return jax.lax.fori_loop(0, k, step, (chosen, jnp.ones(x.shape[0], x.dtype), key))[0]


def spherical_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, init: str = "random",
                     mesh=None, dtype="auto", rows_per_device: int = 4096, verbose: bool = True,
                     log=print) -> tuple[np.ndarray, list[float]]:
    """(centers k × D float32, objective per iteration: mean cosine to the nearest center) of
    Lloyd's algorithm on the mesh. x: this process's normalised rows of the sample (in a
    multi-process job each process holds and reads only its own share)."""
    mesh = mesh or label_mesh()
    dtype = compute_dtype(dtype)
    rng = np.random.default_rng(seed + 1)
    total = int(_process_counts(len(x)).sum())
    if total < k:
        raise UserError(f"kmeans: {total} points cannot make K = {k} centers; lower "
                        "--num_centers or raise --points_per_center")
    centers = shard_centers(init_centers(x, k, init=init, seed=seed), mesh, dtype)
    mine = x
    blocks = Blocks(mesh, rows_per_device)
    objectives = []
    for it in range(niter):
        t = time.perf_counter()
        sums, counts, objective = lloyd(mine, centers, mesh=mesh, num_classes=k, blocks=blocks,
                                        dtype=dtype)
        centers = _new_centers(sums, counts, centers, dtype=dtype)
        counts = np.asarray(multihost_utils.process_allgather(counts, tiled=True))[:k]
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            targets, sources = reseed_sources(counts, empty, rng)
            centers = _split(centers, jnp.asarray(targets), jnp.asarray(sources), dtype=dtype)
        objectives.append(float(objective) / total)
        if verbose:
            log(f"kmeans (jax): iteration {it + 1}/{niter}: mean cosine {objectives[-1]:.5f}, "
                f"{len(empty)} empty re-seeded, {time.perf_counter() - t:.2f} s")
    result = np.asarray(multihost_utils.process_allgather(centers, tiled=True), np.float32)[:k]
    return result / np.maximum(np.linalg.norm(result, axis=1, keepdims=True), 1e-12), objectives
