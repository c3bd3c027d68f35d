"""Top-l centers by inner product for every embedding, shard by shard.

Each embedding shard i is handled by process i % process_count and written to ``parts/part_i.npy``
atomically, so a killed run loses no finished shard and a rerun skips them. When every part exists,
they are concatenated into ``labels.npy`` (N × l int32, most similar first) with ``manifest.json``.
Exact search (faiss IndexFlatIP) for small K; an IVF index for large K, its recall@l against exact
search measured on a sample and recorded.
"""

from __future__ import annotations

import math
import pathlib
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
from tqdm import tqdm

from mlcd_jax import distributed
from mlcd_jax.labels import kmeans, store

# K above this uses IVF unless told otherwise. Exact search runs on BLAS: on a 2-core CPU at K = 100k
# it matched IVF (nprobe 64) in speed, with exact results (bench/labels.py, README).
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
        raise ValueError(f"--index must be auto, flat or ivf, got {kind!r}")
    index.add(centers)
    return index, kind


def recall(index, centers: np.ndarray, queries: np.ndarray, l: int) -> float:
    """Mean |approximate top-l ∩ exact top-l| / l."""
    exact = faiss.IndexFlatIP(centers.shape[1])
    exact.add(centers)
    _, want = exact.search(queries, l)
    _, got = index.search(queries, l)
    return float(np.mean([len(set(a) & set(b)) / l for a, b in zip(want, got)]))


def run(embeddings_dir, centers_path, out_dir, *, num_labels: int, index_kind: str = "auto",
        nprobe: int = 64, process_index: int = 0, process_count: int = 1,
        chunk: int = 65_536, recall_sample: int = 10_000, seed: int = 0) -> dict:
    shards = store.open_embeddings(embeddings_dir)
    centers = store.normalize(np.load(centers_path))
    if centers.shape[1] != shards.dim:
        raise ValueError(f"{centers_path} has width {centers.shape[1]} but the embeddings in "
                         f"{embeddings_dir} have {shards.dim}; were they made by another model?")
    out = pathlib.Path(out_dir)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    index, kind = build_index(centers, index_kind, nprobe)
    mine = [i for i in range(len(shards.files)) if i % process_count == process_index]
    todo = [i for i in mine if not (out / "parts" / f"part_{i:05d}.npy").exists()]
    points = sum(shards.counts[i] for i in todo)
    t = time.perf_counter()
    # (shard, first row) of every chunk, in order; an empty shard has one empty chunk, so it too
    # gets its part.
    chunks = [(i, s) for i in todo for s in range(0, max(shards.counts[i], 1), chunk)]
    read = lambda i, s: store.normalize(shards.load(i)[s:s + chunk])
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
                store.write_npy_atomic(out / "parts" / f"part_{i:05d}.npy", np.concatenate(found))
                found = []
    seconds = time.perf_counter() - t
    result = {"index": kind, "assigned_now": points, "seconds": seconds,
              "points_per_s": points / seconds if points else None, "skipped_shards": len(mine) - len(todo)}
    if kind != "flat":
        queries = kmeans.sample(shards, recall_sample, seed)
        result["recall_at_l"] = recall(index, centers, queries, num_labels)
        print(f"assign: IVF (nprobe {index.nprobe}) recall@{num_labels} = "
              f"{result['recall_at_l']:.4f} on {len(queries)} sampled embeddings")
        if result["recall_at_l"] < 0.9:
            print(f"assign: WARNING recall@{num_labels} {result['recall_at_l']:.3f} < 0.9: many "
                  "labels differ from exact search; raise --nprobe or use --index flat")
    parts = [out / "parts" / f"part_{i:05d}.npy" for i in range(len(shards.files))]
    distributed.barrier("assign: parts written")  # in a multi-process job, process 0 then merges
    if process_index == 0:
        if all(p.exists() for p in parts):
            merge(parts, out, shards, centers, num_labels, result)
        else:
            print(f"assign: {sum(not p.exists() for p in parts)} shards still to do by other "
                  "processes; rerun assign on process 0 when they finish to write labels.npy")
    return result


def merge(parts, out: pathlib.Path, shards, centers, num_labels, result) -> None:
    labels = np.lib.format.open_memmap(out / "labels.npy.tmp", mode="w+", dtype=np.int32,
                                       shape=(shards.total, num_labels))
    offsets = shards.offsets()
    for i, part in enumerate(parts):
        labels[offsets[i]:offsets[i + 1]] = np.load(part, mmap_mode="r")
    labels.flush()
    del labels
    (out / "labels.npy.tmp").replace(out / "labels.npy")
    store.write_json_atomic(out / "manifest.json", {
        "num_examples": shards.total, "num_classes": len(centers), "num_labels": num_labels,
        "source_fingerprint": shards.fingerprint(), "embedding_model": shards.model,
        "embeddings": str(shards.directory), "index": result["index"],
        "recall_at_l": result.get("recall_at_l", 1.0)})
