"""Record keys: what joins an image to its labels, whatever order or tool made each side.

A key is a string (img2dataset's sample key, a folder's relative path). It is hashed to 128 bits
(blake2b): `hash`, the first 64, orders a table; `check`, the other 64, confirms a match, so two
keys whose 64-bit hashes collide still meet only their own rows (no silent wrong join at
LAION's 400 M keys, where a 64-bit collision somewhere is likely).

A key table is the sorted on-disk array of (hash, check, row) of one side (a label store's
embeddings, a dataset's records): 24 bytes per key, memory-mapped, so a lookup touches a few
pages and memory does not grow with N. It is built in bounded memory: entries go to buckets by the
top bits of their hash (files on disk), then each bucket is sorted alone. Building finds duplicate
keys (equal hash and check) and names both rows.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable

import numpy as np

from mlcd_jax.runtime.errors import UserError

HASH = np.dtype([("hash", "<u8"), ("check", "<u8")])
ENTRY = np.dtype([("hash", "<u8"), ("check", "<u8"), ("row", "<i8")])
BYTES_PER_KEY = ENTRY.itemsize
BUCKET_ROWS = 1 << 22  # entries sorted at once while building (~100 MB)


def hashes(keys: Iterable[str]) -> np.ndarray:
    """(n,) HASH of `keys`: the same key gives the same hash on every machine and in every run."""
    digest = b"".join(hashlib.blake2b(k.encode(), digest_size=16).digest() for k in keys)
    return np.frombuffer(digest, HASH).copy()


class DuplicateKey(UserError):
    """A key that appears at two rows of one side."""

    def __init__(self, message: str, rows: tuple[int, int]):
        super().__init__(message)
        self.rows = rows


def build(path, chunks: Iterable[np.ndarray], total: int, *,
          describe: Callable[[int], str] = lambda row: f"row {row}",
          what: str = "keys", bucket_rows: int = BUCKET_ROWS) -> np.ndarray:
    """Write the sorted table of `chunks` (HASH arrays, in row order: their rows are 0, 1, …) to
    `path` (.npy, atomically) and return it memory-mapped. A duplicate key raises DuplicateKey,
    naming both rows by `describe(row)`; nothing is written then."""
    path = pathlib.Path(path)
    buckets = 1 << max(0, int(np.ceil(np.log2(max(1, total) / bucket_rows))))
    shift = np.uint64(64 - int(np.log2(buckets))) if buckets > 1 else None
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        files = [open(os.path.join(tmp, f"{b}"), "wb") for b in range(buckets)]
        row = 0
        for chunk in chunks:
            entries = np.empty(len(chunk), ENTRY)
            entries["hash"], entries["check"] = chunk["hash"], chunk["check"]
            entries["row"] = np.arange(row, row + len(chunk))
            row += len(chunk)
            if shift is None:
                files[0].write(entries.tobytes())
                continue
            which = (entries["hash"] >> shift).astype(np.int64)
            order = np.argsort(which, kind="stable")
            ends = np.cumsum(np.bincount(which, minlength=buckets))
            for f, part in zip(files, np.split(entries[order], ends[:-1])):
                f.write(part.tobytes())
        for f in files:
            f.close()
        if row != total:
            raise UserError(f"{what}: {row} keys read but {total} expected")
        out = np.lib.format.open_memmap(f"{path}.tmp", "w+", ENTRY, (total,))
        done = 0
        for b in range(buckets):
            part = np.fromfile(os.path.join(tmp, f"{b}"), ENTRY)
            part = part[np.lexsort((part["check"], part["hash"]))]
            same = np.flatnonzero((part["hash"][1:] == part["hash"][:-1])
                                  & (part["check"][1:] == part["check"][:-1]))
            if same.size:
                del out
                os.unlink(f"{path}.tmp")
                a, b_ = sorted(int(r) for r in part["row"][same[0]:same[0] + 2])
                raise DuplicateKey(f"{what}: one key appears twice, at {describe(a)} and at "
                                   f"{describe(b_)}; keys must be unique", (a, b_))
            out[done:done + len(part)] = part
            done += len(part)
        out.flush()
        del out
    os.replace(f"{path}.tmp", path)
    return np.load(path, mmap_mode="r")


def open_table(path) -> np.ndarray:
    table = np.load(path, mmap_mode="r")
    if table.dtype != ENTRY or table.ndim != 1:
        raise UserError(f"{path}: not a key table ({table.dtype}, shape {table.shape}); "
                        "remake it")
    return table


def lookup(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The row of each query (HASH) in `table`, -1 where it is absent. Sorted queries read the
    table in one sweep; any order works."""
    rows = np.full(len(queries), -1, np.int64)
    if not len(table) or not len(queries):
        return rows
    at = np.searchsorted(table["hash"], queries["hash"])
    found = np.minimum(at, len(table) - 1)
    candidate = table[found]
    same_hash = (at < len(table)) & (candidate["hash"] == queries["hash"])
    hit = same_hash & (candidate["check"] == queries["check"])
    rows[hit] = candidate["row"][hit]
    for q in np.flatnonzero(same_hash & ~hit):  # 64-bit collisions: walk the run of equal hashes
        p = int(at[q]) + 1
        while p < len(table) and table["hash"][p] == queries["hash"][q]:
            if table["check"][p] == queries["check"][q]:
                rows[q] = table["row"][p]
                break
            p += 1
    return rows
