"""Records of what was made, and writes a kill cannot tear: the digests, checksums, atomic writes
and resumable pieces that data, labels, LiT, ablate and evaluate share.

A resumable step (embed's shards, assign's parts, LiT's features, ablate's runs) writes each piece
as ``NAME.npy`` plus ``NAME.json`` (what made it: a fingerprint of its inputs and parameters; its
rows and sha256), so a rerun reuses only pieces made from the same inputs and a merge notices a
piece that changed on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np


def digest(*parts) -> str:
    """A short, stable fingerprint of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def array_sha256(array: np.ndarray, chunk_bytes: int = 1 << 26) -> str:
    """sha256 of the array's bytes, read a chunk of rows at a time (a memory-mapped array of any
    size is hashed in bounded memory; the digest is that of the whole buffer)."""
    h = hashlib.sha256()
    if array.ndim == 0 or not len(array):
        h.update(np.ascontiguousarray(array).data)
        return h.hexdigest()
    rows = max(1, chunk_bytes // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        h.update(np.ascontiguousarray(array[start:start + rows]).data)
    return h.hexdigest()


def write_piece(path: pathlib.Path, array: np.ndarray, meta: dict) -> None:
    """One piece of a resumable step: the array at `path` (.npy), then `path`.json with `meta`,
    its rows and its sha256. The old record goes first, so a kill at any moment leaves either a
    matching pair or a piece the next run does not count as done."""
    record = path.with_suffix(".json")
    record.unlink(missing_ok=True)
    write_npy_atomic(path, array)
    write_json_atomic(record, meta | {"rows": len(array), "sha256": array_sha256(array)})


def record_piece(path: pathlib.Path, meta: dict) -> None:
    """The record of a piece already written in place at `path` (.npy, e.g. filled through a
    memory map): its rows and sha256, read back a chunk at a time, with `meta`."""
    array = np.load(path, mmap_mode="r")
    write_json_atomic(path.with_suffix(".json"),
                      meta | {"rows": len(array), "sha256": array_sha256(array)})


def piece_record(path: pathlib.Path) -> dict | None:
    """The record of a finished piece (None: not finished, or its array is missing or has
    another number of rows than recorded)."""
    record = path.with_suffix(".json")
    if not (path.is_file() and record.is_file()):
        return None
    try:
        meta = json.loads(record.read_text())
        rows = np.load(path, mmap_mode="r").shape[0]
    except (ValueError, OSError):
        return None
    return meta if meta.get("rows") == rows else None


def fresh_piece(path: pathlib.Path, fingerprint: str, *, verify_sha256: bool = False,
                companions: tuple[str, ...] = ()) -> dict | None:
    """The record of the piece at `path` if a rerun may reuse it, else None (make it again): it is
    finished (`piece_record`: its array reads back with the recorded rows) and was made with
    `fingerprint`; each companion, the array `path.with_suffix(suffix)` written beside it (e.g.
    ".labels.npy"), reads back with one entry per row; with `verify_sha256`, the array's bytes
    still hash to the recorded sha256 (a full read: for pieces that bit rot or a copy may have
    changed under an intact record). A damaged array or companion is not fresh."""
    record = piece_record(path)
    if record is None or record.get("fingerprint") != fingerprint:
        return None
    if not (verify_sha256 or companions):
        return record
    try:
        array = np.load(path, mmap_mode="r")
        for suffix in companions:
            if np.load(path.with_suffix(suffix), mmap_mode="r").shape != (len(array),):
                return None
        if verify_sha256 and array_sha256(array) != record.get("sha256"):
            return None
    except (OSError, ValueError, EOFError):
        return None
    return record


def write_npy_atomic(path: pathlib.Path, array: np.ndarray) -> None:
    """Write then rename, so a killed job never leaves a half-written file under the final name."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_json_atomic(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class Mapped:
    """An .npy array read memory-mapped and opened lazily in each process: it pickles as its path,
    so grain's worker processes map the same file again instead of copying it."""

    def __init__(self, path):
        self.path, self._array = str(path), None

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self):
        return len(self.array())

    def __getitem__(self, i):
        return self.array()[i]

    def fingerprint(self) -> str:
        stat = os.stat(self.path)
        return digest(pathlib.Path(self.path).name, stat.st_size, stat.st_mtime_ns)

    def __getstate__(self):
        return {"path": self.path, "_array": None}
