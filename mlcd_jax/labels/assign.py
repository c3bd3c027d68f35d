"""Top-l centers by inner product for every embedding, shard by shard.

Each embedding shard i is handled by process i % process_count and written to ``parts/part_i.npy``
atomically with ``part_i.json``: a fingerprint of what made it (the centers, l, the index, the
embedding shard), its rows and sha256. A killed run loses no finished part and a rerun skips the
parts made from the same inputs; parts of other centers (a re-clustering into the same directory)
or another l are redone. When every part exists, each is checked against its record (fingerprint,
rows, sha256, ids in [0, K)) and they are concatenated into ``labels.npy`` (N × l int32, most
similar first), the embeddings' keys into the sorted key table ``keys.npy`` (by which a record finds
its row, `mlcd_jax/data/record_keys.py`; a key twice is an error naming both rows), then
``manifest.json``.
Embeddings without keys make a store without them: joined to records by position, and said.
Backends: `faiss` (CPU): exact search (IndexFlatIP) for small K, an IVF index for large K, its
recall@l against exact search measured on a sample and recorded; `jax`: exact search on the device
mesh (`labels/jax_backend.py`: the centers split over every device of every process); `auto`: jax
where an accelerator is present, else faiss.
"""

from __future__ import annotations

import math
import pathlib
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from mlcd_jax.data import record_keys
from mlcd_jax.labels import jax_backend, kmeans, store
from mlcd_jax.runtime import backend as platform, distributed, files
from mlcd_jax.runtime.errors import MissingFile, UserError

# K above this uses IVF unless told otherwise. Exact search runs on BLAS: on a 2-core CPU at
# K = 100k it matched IVF (nprobe 64) in speed, with exact results (bench/labels.py, README).
EXACT_UP_TO = 262_144


def build_index(centers: np.ndarray, kind: str = "auto", nprobe: int = 64):
    k, d = centers.shape
    if kind == "auto":
        kind = "flat" if k <= EXACT_UP_TO else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, int(4 * math.sqrt(k)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(centers)
        index.nprobe = min(nprobe, nlist)
    else:
        raise UserError(f"--index must be auto, flat or ivf, got {kind!r}")
    index.add(centers)
    return index, kind


def recall(index, centers: np.ndarray, queries: np.ndarray, l: int) -> float:
    """Mean |approximate top-l ∩ exact top-l| / l."""
    exact = faiss.IndexFlatIP(centers.shape[1])
    exact.add(centers)
    _, want = exact.search(queries, l)
    _, got = index.search(queries, l)
    return float(np.mean([len(set(a) & set(b)) / l for a, b in zip(want, got)]))


def resolve_backend(backend: str) -> str:
    """`auto`: jax where jax has an accelerator, faiss on CPU (`platform.labels_backend`)."""
    if backend not in platform.LABEL_BACKENDS:
        raise UserError(f"--backend must be one of {platform.LABEL_BACKENDS}, got {backend!r}")
    return platform.labels_backend(backend)


class _JaxIndex:
    """The jax backend behind faiss's `search(x, l)`. Every process must make the same number of
    mesh calls: they agree on it before the first (`agree`), and a process out of chunks makes
    empty ones (`finish`)."""

    def __init__(self, centers, num_labels, dtype, mesh=None):
        self.searcher = jax_backend.Searcher(centers, num_labels, dtype=dtype, mesh=mesh)
        self.calls = self.most = 0

    def _calls(self, rows: int) -> int:
        return max(1, -(-rows // self.searcher.blocks.per_process))

    def agree(self, chunk_rows) -> None:
        mine = sum(self._calls(r) for r in chunk_rows)
        self.most = (mine if jax.process_count() == 1 else
                     int(np.max(multihost_utils.process_allgather(np.int64(mine)))))

    def search(self, x, l):
        calls = self._calls(len(x))
        self.calls += calls
        return self.searcher.search(x, calls=calls)

    def finish(self):
        if self.most > self.calls:
            self.searcher.search(np.zeros((0, self.searcher.centers.shape[1]), np.float32),
                                 calls=self.most - self.calls)


def run(embeddings_dir, centers_path, out_dir, *, num_labels: int, index_kind: str = "auto",
        nprobe: int = 64, process_index: int = 0, process_count: int = 1,
        chunk: int = 65_536, recall_sample: int = 10_000, seed: int = 0,
        backend: str = "faiss", jax_dtype: str = "auto", key_column: str | None = None,
        mesh=None) -> dict:
    """Labels of every embedding in `embeddings_dir` (see the module's docstring); `mesh`: the
    jax backend's devices (default: every device of the job)."""
    shards = store.open_embeddings(embeddings_dir, key_column)
    centers_path = pathlib.Path(centers_path)
    if not centers_path.is_file():
        raise MissingFile(f"{centers_path} not found: run `python -m mlcd_jax.labels kmeans "
                          f"--out {centers_path.parent}` first, or pass --centers")
    raw_centers = np.load(centers_path)
    centers = store.normalize(raw_centers)
    if centers.shape[1] != shards.dim:
        raise UserError(f"{centers_path} has width {centers.shape[1]} but the embeddings in "
                        f"{embeddings_dir} have {shards.dim}; were they made by another model?")
    if not 1 <= num_labels <= len(centers):
        raise UserError(f"--num_labels {num_labels}: must lie in [1, K = {len(centers)}] (the "
                        f"centers in {centers_path})")
    out = pathlib.Path(out_dir)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    backend = resolve_backend(backend)
    if backend == "jax":
        index = _JaxIndex(centers, num_labels, jax_dtype, mesh)
        kind = f"exact (jax, {index.searcher.dtype.name})"
    else:
        index, kind = build_index(centers, index_kind, nprobe)
    made_by = files.digest(files.array_sha256(raw_centers), num_labels, kind,
                           index.nprobe if kind == "ivf" else None)
    fingerprints = [files.digest(made_by, shards.shard_fingerprint(i))
                    for i in range(len(shards.files))]
    parts = [out / "parts" / f"part_{i:05d}.npy" for i in range(len(shards.files))]
    finished = lambda i: files.fresh_piece(parts[i], fingerprints[i]) is not None
    mine = [i for i in range(len(shards.files)) if i % process_count == process_index]
    todo = [i for i in mine if not finished(i)]
    stale = [i for i in todo if files.piece_record(parts[i]) is not None]
    if stale:
        print(f"assign: redoing {len(stale)} parts made from other centers, another "
              f"--num_labels/--index or other embeddings (e.g. {parts[stale[0]].name})")
    points = sum(shards.counts[i] for i in todo)
    t = time.perf_counter()
    # (shard, first row) of every chunk, in order; an empty shard has one empty chunk, so it too
    # gets its part.
    chunks = [(i, s) for i in todo for s in range(0, max(shards.counts[i], 1), chunk)]
    read = lambda i, s: store.normalize(shards.load(i)[s:s + chunk])
    if backend == "jax":
        index.agree([min(chunk, shards.counts[i] - s) for i, s in chunks])
    # The next chunk is read and normalised in a thread while faiss searches this one (both
    # release the GIL), so reading float16 shards from disk hides behind the search.
    with (tqdm(total=points, desc=f"assign (process {process_index})", unit="pt",
               unit_scale=True) as bar, ThreadPoolExecutor(1) as reader):
        pending = reader.submit(read, *chunks[0]) if chunks else None
        found = []  # the current shard's labels, chunk by chunk
        for n, (i, _) in enumerate(chunks):
            x = pending.result()
            shard_ends = n + 1 == len(chunks) or chunks[n + 1][0] != i
            if n + 1 < len(chunks):
                pending = reader.submit(read, *chunks[n + 1])
            found.append(index.search(x, num_labels)[1].astype(np.int32))
            bar.update(len(x))
            if shard_ends:
                files.write_piece(parts[i], np.concatenate(found),
                                  {"fingerprint": fingerprints[i], "shard": shards.files[i].name})
                found = []
    if backend == "jax":
        index.finish()
    seconds = time.perf_counter() - t
    result = {"index": kind, "assigned_now": points, "seconds": seconds,
              "points_per_s": points / seconds if points else None,
              "skipped_shards": len(mine) - len(todo)}
    if kind == "ivf":
        queries = kmeans.sample(shards, recall_sample, seed)
        result["recall_at_l"] = recall(index, centers, queries, num_labels)
        print(f"assign: IVF (nprobe {index.nprobe}) recall@{num_labels} = "
              f"{result['recall_at_l']:.4f} on {len(queries)} sampled embeddings")
        if result["recall_at_l"] < 0.9:
            print(f"assign: WARNING recall@{num_labels} {result['recall_at_l']:.3f} < 0.9: many "
                  "labels differ from exact search; raise --nprobe or use --index flat")
    distributed.barrier("assign: parts written")  # in a multi-process job, process 0 then merges
    if process_index == 0:
        left = [i for i in range(len(parts)) if not finished(i)]
        if not left:
            merge(parts, fingerprints, out, shards, centers, num_labels, result)
        else:
            print(f"assign: {len(left)} shards still to do by other processes; rerun assign on "
                  "process 0 when they finish to write labels.npy")
    return result


def merge(parts, fingerprints, out: pathlib.Path, shards, centers, num_labels, result) -> None:
    """labels.npy from the parts, each checked against its record first: a part that changed
    since it was written (bit rot, a copy from another shard) is named, its record removed so that
    a rerun redoes it, and nothing is merged."""
    offsets, k = shards.offsets(), len(centers)
    labels = np.lib.format.open_memmap(out / "labels.npy.tmp", mode="w+", dtype=np.int32,
                                       shape=(shards.total, num_labels))
    for i, part in enumerate(parts):
        array, record = np.load(part), files.piece_record(part) or {}
        problem = None
        if record.get("fingerprint") != fingerprints[i]:
            problem = "it was made from other inputs"
        elif array.shape != (shards.counts[i], num_labels):
            problem = f"shape {array.shape}, expected {(shards.counts[i], num_labels)}"
        elif files.array_sha256(array) != record.get("sha256"):
            problem = "its contents changed since it was written (checksum)"
        elif array.size and (array.min() < 0 or array.max() >= k):
            problem = f"ids outside [0, {k})"
        if problem:
            del labels
            (out / "labels.npy.tmp").unlink()
            part.with_suffix(".json").unlink(missing_ok=True)
            raise UserError(f"assign: {part}: {problem}; rerun assign to redo that part")
        labels[offsets[i]:offsets[i + 1]] = array
    labels.flush()
    del labels
    (out / "manifest.json").unlink(missing_ok=True)  # no manifest vouches for a half-made store
    keys = None
    if shards.keyed:
        bar = tqdm(total=shards.total, desc="assign: key table", unit="key", unit_scale=True)
        def hashed():
            for i in range(len(shards.files)):
                yield shards.key_hashes(i)
                bar.update(shards.counts[i])
        try:
            record_keys.build(out / "keys.npy", hashed(), shards.total, describe=shards.describe,
                              what=f"the embeddings in {shards.directory}")
        except UserError as e:
            (out / "labels.npy.tmp").unlink()
            raise UserError(f"assign: {e}; the parts are kept, rerun assign once the keys "
                            "are fixed") from None
        finally:
            bar.close()
        keys = "keys.npy"
    else:
        (out / "keys.npy").unlink(missing_ok=True)
        print(f"assign: {shards.directory} has no keys beside its embeddings, so the store has "
              "none: the trainer will join its rows to records by position (same order, same "
              "count); embed with `labels embed`, or give clip-retrieval's metadata/ parquet, "
              "to join by key")
    (out / "labels.npy.tmp").replace(out / "labels.npy")
    store.write_label_manifest(out, num_examples=shards.total, num_classes=len(centers),
                               num_labels=num_labels, embeddings=shards, index=result["index"],
                               recall_at_l=result.get("recall_at_l", 1.0), keys=keys)
