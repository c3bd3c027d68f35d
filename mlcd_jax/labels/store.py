"""On-disk formats of the label pipeline.

Embeddings: a directory of float16 ``.npy`` shards (N_i × D, L2-normalised) with their keys
(``emb_{i}.keys.parquet``, column "key": the record each row embeds) and ``manifest.json``
({"shards": [{"file", "count", "fingerprint", "keys"}], "dim", "model", "source"}), as `embed`
writes it; or clip-retrieval's ``img_emb/img_emb_{i}.npy`` (LAION's published format), read as
is, each with its ``metadata/metadata_{i}.parquet`` (one row per embedding; the key in column
``image_path``, webdataset's sample key, unless told another). Embeddings without keys (a plain
clip-retrieval ``img_emb/`` folder, an older `embed`) still work, joined to records by position.

Label store: ``labels.npy`` (N × l int32, most similar center first; read memory-mapped), the
embeddings' keys as a sorted key table ``keys.npy`` (`mlcd_jax/data/record_keys.py`: row i of
labels.npy is
the labels of the record whose key hashes to an entry with row i) and ``manifest.json`` (N, K, l,
the embeddings' fingerprint and model, the assign index and recall, "keys": the table or null).

A store of regions (`labels embed --regions` → kmeans → assign, or `labels ocr`) is the same
format; its keys are the regions' keys, f"{record key}#{region id}" (`data/regions.py`), and an OCR
store's manifest says so ("regions": {"kind": "ocr", ...}).

Both are written through `records` (atomic writes; `embed`'s shards and `assign`'s parts are
resumable pieces); this module owns both manifests, reading and writing.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np

from mlcd_jax.data import record_keys
from mlcd_jax.runtime.errors import MissingFile, UserError
from mlcd_jax.runtime.files import array_sha256, digest, write_json_atomic, write_npy_atomic

CLIP_RETRIEVAL_KEY = "image_path"  # clip-retrieval's metadata column of webdataset's sample key


@dataclasses.dataclass(frozen=True)
class EmbeddingShards:
    directory: pathlib.Path
    files: tuple[pathlib.Path, ...]
    counts: tuple[int, ...]
    dim: int
    model: str
    fingerprints: tuple[str, ...] = ()  # per shard: what made it (empty: not known)
    key_files: tuple[pathlib.Path, ...] = ()  # per shard: its keys (parquet); empty: none
    key_column: str = "key"

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def keyed(self) -> bool:
        return bool(self.key_files)

    def keys(self, i: int) -> list[str]:
        """Shard i's keys, one per embedding, in row order."""
        import pyarrow.parquet as pq
        path = self.key_files[i]
        try:
            schema = pq.read_schema(path)
            if self.key_column not in schema.names:
                raise UserError(f"{path} has no column {self.key_column!r} (it has "
                                f"{', '.join(schema.names)}); pass --key_column with the one "
                                "that holds each image's key")
            column = pq.read_table(path, columns=[self.key_column]).column(0)
        except (OSError, pq.lib.ArrowException) as e:
            raise UserError(f"{path} is not a readable parquet file ({e}); remake it") from None
        if len(column) != self.counts[i]:
            raise UserError(f"{path} has {len(column):,} rows but {self.files[i]} holds "
                            f"{self.counts[i]:,} embeddings: each embedding needs its row")
        if column.null_count:
            raise UserError(f"{path}: {column.null_count} rows have no {self.key_column!r}")
        return [str(k) for k in column.to_pylist()]

    def key_hashes(self, i: int) -> np.ndarray:
        return record_keys.hashes(self.keys(i))

    def shard_fingerprint(self, i: int) -> str:
        """What made shard i: embed's record of it, else its name, size and modification time."""
        if self.fingerprints and self.fingerprints[i]:
            return self.fingerprints[i]
        stat = self.files[i].stat()
        return digest(self.files[i].name, self.counts[i], stat.st_size, stat.st_mtime_ns)

    def describe(self, row: int) -> str:
        """Where embedding `row` (of all shards, in order) is, and its key."""
        i = int(np.searchsorted(self.offsets(), row, side="right")) - 1
        local = row - int(self.offsets()[i])
        key = f", key {self.keys(i)[local]!r}" if self.keyed else ""
        return f"{self.files[i].name} row {local}{key}"

    def load(self, i: int) -> np.ndarray:
        """Shard i, memory-mapped (float16 or float32, as stored)."""
        return np.load(self.files[i], mmap_mode="r")

    def fingerprint(self) -> str:
        """Identifies the embeddings a label store was made from: every shard's name, size and
        what made it, the width and the model."""
        return digest([[f.name, c, self.shard_fingerprint(i)]
                       for i, (f, c) in enumerate(zip(self.files, self.counts))],
                      self.dim, self.model)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)


def open_embeddings(directory, key_column: str | None = None) -> EmbeddingShards:
    """The embeddings in `directory` (embed's manifest, or clip-retrieval's img_emb/ with its
    metadata/ parquet, whose `key_column` (default image_path) holds each row's key)."""
    directory = pathlib.Path(directory)
    manifest = directory / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        files = tuple(directory / s["file"] for s in m["shards"])
        counts = tuple(int(s["count"]) for s in m["shards"])
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingFile(f"{manifest} lists shards that are missing: {missing[:5]}; "
                              "rerun `embed` (it redoes only missing shards)")
        for f, count in zip(files, counts):  # the .npy headers must say what the manifest says
            shape = np.load(f, mmap_mode="r").shape
            if shape != (count, int(m["dim"])):
                raise UserError(f"{f} holds {shape[0]} × {shape[1]} embeddings but {manifest} "
                                f"says {count} × {m['dim']}: the directory mixes two embedding "
                                "runs; embed into a new --out")
        keys = tuple(directory / s["keys"] for s in m["shards"] if s.get("keys"))
        missing = [f.name for f in keys if not f.is_file()]
        if missing:
            raise MissingFile(f"{manifest} lists key files that are missing: {missing[:5]}; "
                              "embed again into a new --out")
        return EmbeddingShards(directory, files, counts, int(m["dim"]), m.get("model", "unknown"),
                               tuple(s.get("fingerprint", "") for s in m["shards"]),
                               keys if len(keys) == len(files) else (),
                               key_column or "key")
    clip = sorted((directory / "img_emb").glob("img_emb_*.npy"),
                  key=lambda p: int(re.search(r"(\d+)\.npy$", p.name).group(1)))
    if clip:  # clip-retrieval: counts and dim from the .npy headers, no data read
        shapes = [np.load(f, mmap_mode="r").shape for f in clip]
        if len({s[1] for s in shapes}) != 1:
            raise UserError(f"{directory}/img_emb: shards differ in width: "
                            f"{sorted({s[1] for s in shapes})}")
        metadata = [directory / "metadata" / f"metadata_{f.name[len('img_emb_'):-4]}.parquet"
                    for f in clip]
        found = [m.is_file() for m in metadata]
        if any(found) and not all(found):
            missing = [m.name for m, ok in zip(metadata, found) if not ok]
            raise MissingFile(f"{directory}/metadata: {missing[:3]} missing: each "
                              "img_emb_N.npy needs its metadata_N.parquet (its keys)")
        fingerprints = tuple(
            digest(f.name, s[0], f.stat().st_size, f.stat().st_mtime_ns,
                   *((m.stat().st_size, m.stat().st_mtime_ns) if ok else ()))
            for f, s, m, ok in zip(clip, shapes, metadata, found))
        return EmbeddingShards(directory, tuple(clip), tuple(s[0] for s in shapes), shapes[0][1],
                               "clip-retrieval", fingerprints,
                               tuple(metadata) if all(found) else (),
                               key_column or CLIP_RETRIEVAL_KEY)
    raise MissingFile(f"{directory}: no manifest.json (from "
                      "`python -m mlcd_jax.labels embed`) and no img_emb/img_emb_*.npy "
                      "(clip-retrieval); point --embeddings at one")


def normalize(x: np.ndarray) -> np.ndarray:
    """Vectors (the last axis) L2-normalised, float32, in a new array (the input, often
    memory-mapped, is left)."""
    return normalize_in_place(np.array(x, np.float32))


def normalize_in_place(x: np.ndarray) -> np.ndarray:
    """Vectors (the last axis) of the float32 array `x` L2-normalised in place; returns `x`."""
    norms = np.sqrt(np.einsum("...i,...i->...", x, x))  # 4× faster than np.linalg.norm here
    x /= np.maximum(norms, 1e-12)[..., None]
    return x


def write_embeddings(directory, shards, *, model: str, source: str = "",
                     keys=None) -> EmbeddingShards:
    """Write L2-normalised float16 shards emb_00000.npy, ..., each with its `keys` (a list per
    shard; None: no keys, joined by position) and the manifest (last, atomically)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries, dim = [], None
    for i, x in enumerate(shards):
        x = normalize(x).astype(np.float16)
        dim = x.shape[1]
        write_npy_atomic(directory / f"emb_{i:05d}.npy", x)
        entry = {"file": f"emb_{i:05d}.npy", "count": len(x)}
        if keys is not None:
            entry["keys"] = write_keys(directory / keys_name(entry["file"]), keys[i]).name
        entries.append(entry | {"fingerprint": digest(model, source, array_sha256(x))})
    write_embeddings_manifest(directory, entries, dim=dim, model=model, source=source)
    return open_embeddings(directory)


def keys_name(shard: str) -> str:
    """The keys file beside embedding shard `shard` (emb_00000.npy → emb_00000.keys.parquet)."""
    return shard.removesuffix(".npy") + ".keys.parquet"


def write_keys(path: pathlib.Path, keys) -> pathlib.Path:
    """A shard's keys as parquet (column "key"), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"key": pa.array(list(keys), pa.string())}), tmp)
    tmp.replace(path)
    return path


def write_embeddings_manifest(directory, shards: list[dict], *, dim: int, model: str,
                              source: str) -> None:
    """The embeddings' manifest (`open_embeddings` reads it), written last and atomically:
    `shards` as [{"file", "count", "fingerprint"}] in order."""
    write_json_atomic(pathlib.Path(directory) / "manifest.json",
                      {"shards": shards, "dim": dim, "model": model, "source": source})


@dataclasses.dataclass(frozen=True)
class LabelStore:
    labels: np.ndarray  # (N, l) int32, memory-mapped
    manifest: dict
    path: pathlib.Path  # labels.npy (grain's workers map it again in their own processes)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def keys_path(self) -> pathlib.Path | None:
        """The sorted key table of the rows (None: a store made without keys: by position)."""
        keys = self.manifest.get("keys")
        return self.path.parent / keys["file"] if keys else None

    def keys(self) -> np.ndarray:
        return record_keys.open_table(self.keys_path)


def open_label_store(directory, *, num_examples: int | None = None,
                     num_classes: int | None = None) -> LabelStore:
    """The label store, checked against what the caller expects (fails early, naming the file)."""
    directory = pathlib.Path(directory)
    manifest_file, labels_file = directory / "manifest.json", directory / "labels.npy"
    for f in (manifest_file, labels_file):
        if not f.is_file():
            raise MissingFile(f"{f} not found: run `python -m mlcd_jax.labels assign` first")
    manifest = json.loads(manifest_file.read_text())
    labels = np.load(labels_file, mmap_mode="r")
    n, l, k = manifest["num_examples"], manifest["num_labels"], manifest["num_classes"]
    if labels.shape != (n, l) or labels.dtype != np.int32:
        raise UserError(f"{labels_file}: shape {labels.shape} {labels.dtype}, but {manifest_file} "
                        f"says ({n}, {l}) int32; the store is damaged, rerun `assign`")
    keys = manifest.get("keys")
    if keys:
        table = directory / keys["file"]
        try:
            whole = record_keys.open_table(table).shape == (n,)
        except (OSError, ValueError):
            whole = False
        if not whole:
            raise UserError(f"{table} is missing or does not hold {n:,} keys as {manifest_file} "
                            "says; the store is damaged, rerun `assign`")
    elif num_examples is not None and n != num_examples:
        raise UserError(f"{labels_file} labels {n} examples but the dataset has {num_examples}, "
                        "and the store has no keys to join them by (it was made before keys, or "
                        "from embeddings without them), so rows are matched by position; was it "
                        "made from another dataset (or split)?")
    if num_classes is not None and k != num_classes:
        raise UserError(f"{labels_file} uses K = {k} classes but config.head.num_classes = "
                        f"{num_classes}; set them equal")
    return LabelStore(labels, manifest, labels_file)


def write_label_manifest(directory, *, num_examples: int, num_classes: int, num_labels: int,
                         embeddings: EmbeddingShards, index: str, recall_at_l: float,
                         keys: str | None) -> None:
    """The label store's manifest (`open_label_store` reads and checks it), written after
    labels.npy and its key table `keys` (None: no keys): what the labels are and which
    embeddings (and assign index) made them."""
    write_json_atomic(pathlib.Path(directory) / "manifest.json", {
        "num_examples": num_examples, "num_classes": num_classes, "num_labels": num_labels,
        "source_fingerprint": embeddings.fingerprint(), "embedding_model": embeddings.model,
        "embeddings": str(embeddings.directory), "index": index, "recall_at_l": recall_at_l,
        "keys": {"file": keys, "count": num_examples, "column": embeddings.key_column,
                 "bytes_per_record": record_keys.BYTES_PER_KEY} if keys else None})


def check_label_range(store: LabelStore, chunk: int = 1 << 20, *,
                      allow_empty: bool = False) -> None:
    """Every id in [-1, K) and every example with a label (`allow_empty`: a row of −1 alone
    too, which a region head skips): a full read, done once before training."""
    for start in range(0, len(store.labels), chunk):
        part = np.asarray(store.labels[start:start + chunk])
        bad = np.flatnonzero((part < -1).any(1) | (part >= store.num_classes).any(1)
                             | ((part[:, 0] < 0) & (not allow_empty)))
        if bad.size:
            row = start + int(bad[0])
            raise UserError(f"labels.npy row {row} is {part[bad[0]].tolist()}: ids must lie in "
                            f"[-1, {store.num_classes}) with the first label ≥ 0")


def write_region_label_manifest(directory, *, num_examples: int, num_classes: int,
                                num_labels: int, kind: str, source_fingerprint: str,
                                keys: str, **about) -> None:
    """The manifest of a label store of regions made without embeddings (`labels ocr`: token
    ids), read by `open_label_store` as any other: "regions" says what its rows are (`kind`, and
    `about`: e.g. the tokenizer), so a region join knows which regions it should hold."""
    write_json_atomic(pathlib.Path(directory) / "manifest.json", {
        "num_examples": num_examples, "num_classes": num_classes, "num_labels": num_labels,
        "source_fingerprint": source_fingerprint, "embedding_model": None, "embeddings": None,
        "index": kind, "recall_at_l": 1.0, "regions": {"kind": kind} | about,
        "keys": {"file": keys, "count": num_examples, "column": "key",
                 "bytes_per_record": record_keys.BYTES_PER_KEY}})
