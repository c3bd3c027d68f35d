"""Convert's record index: each record's key, original name and caption, read by record in O(1).

A convert output PREFIX has, beside its shards PREFIX-0000k-of-N.array_record:

* PREFIX.index.jsonl     one JSON line per record, in record order: {"record", "key", "name",
                         "caption"?} (a person can read it)
* PREFIX.index.offsets   the byte offset of every line and the file's size: N + 1 little-endian
                         int64 (memory-mapped, so record i's line is one seek away)
* PREFIX.index.hashes    every record's key hashed (`mlcd_jax/data/record_keys.py`): N × 16 bytes
in record                          order, memory-mapped (a join reads it without parsing a line)
* PREFIX.index.classes   for a folder whose images sit in class sub-folders: each record's class
                         (int32 in record order, -1 for an image outside them; the names are the
                         manifest's "classes"), memory-mapped
* PREFIX.index.regions   with `convert --regions` only: where each record's regions start, all
                         of them and those with a text: (N + 1) × 2 little-endian int64, cumulative
                         (memory-mapped: a record's counts, or any range's, without a line read)
* PREFIX.index.json      the manifest, written last: records, each shard's name, records and
                         bytes, how many records have a caption, the .jsonl's size, "keys", and
                         "regions" (where they came from, how many, what was dropped, a sha256)

A record's regions (`data/regions.py`) are in its line: "boxes" [[x0, y0, x1, y1], ...] in pixels
of the decoded image, "texts" (where a region has one), "region_ids" (where boxes were dropped
before others: each region's place among its image's annotations, the "#id" of its key) and
"classes" (where a region has one: its class, -1 unknown; the names are the manifest's
"regions" → "classes").

The key is what labels are joined by (img2dataset's sample key, a folder's relative path); keys are
unique within an output (`finish` checks, in bounded memory). Nothing here holds more than one
record in memory: LAION's 400 M records are 400 M lines a seek apart. An index from before the
offsets table or the keys is named in one line with the command that adds them
(`python -m mlcd_jax.data.convert --reindex PREFIX`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

from mlcd_jax.data import record_keys, regions as regions_lib
from mlcd_jax.runtime.errors import MissingFile, UserError
from mlcd_jax.runtime.files import write_json_atomic

FORMAT = 2  # 2: keys (1: names and captions only)


class StaleIndex(UserError):
    """The index does not describe the shards beside it (or predates the offsets table)."""


def paths(prefix) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(lines, offsets, manifest) of a convert output prefix."""
    prefix = str(prefix)
    return (pathlib.Path(f"{prefix}.index.jsonl"), pathlib.Path(f"{prefix}.index.offsets"),
            pathlib.Path(f"{prefix}.index.json"))


def hashes_path(prefix) -> pathlib.Path:
    return pathlib.Path(f"{prefix}.index.hashes")


def classes_path(prefix) -> pathlib.Path:
    return pathlib.Path(f"{prefix}.index.classes")


def regions_path(prefix) -> pathlib.Path:
    return pathlib.Path(f"{prefix}.index.regions")


class _RegionTable:
    """Writes PREFIX.index.regions a record at a time and digests every record's regions."""

    def __init__(self, path: pathlib.Path):
        self.file, self.sha = open(path, "wb"), hashlib.sha256()
        self.counts = np.zeros(2, np.int64)  # regions, with a text
        self.file.write(self.counts.astype("<i8").tobytes())

    def add(self, key: str, fields: dict) -> None:
        boxes = fields.get("boxes", ())
        self.counts += (len(boxes), sum(t is not None for t in fields.get("texts", ())))
        self.file.write(self.counts.astype("<i8").tobytes())
        if boxes:
            self.sha.update(json.dumps([key, fields], ensure_ascii=False).encode())

    def info(self) -> dict:
        return {"regions": int(self.counts[0]), "with_text": int(self.counts[1]),
                "sha256": self.sha.hexdigest()}


class Writer:
    """Writes the index as convert goes: a line and an offset per record (nothing kept in
    memory), the manifest at `finish`. Until then everything is under .tmp names."""

    def __init__(self, prefix, *, regions: dict | None = None):
        """`regions`: what made the records' regions (`data/regions.py`'s summary; None: no
        regions), completed at `finish` and kept in the manifest."""
        self.prefix = str(prefix)
        self.lines_path, self.offsets_path, self.manifest_path = paths(prefix)
        self.hashes_path = hashes_path(prefix)
        self._lines = open(f"{self.lines_path}.tmp", "wb")
        self._offsets = open(f"{self.offsets_path}.tmp", "wb")
        self._hashes = open(f"{self.hashes_path}.tmp", "wb")
        self._classes = open(f"{classes_path(prefix)}.tmp", "wb")
        self.class_names: dict[str, int] = {}  # a class sub-folder's name → its id, as met
        self.regions = regions
        self._regions = (_RegionTable(pathlib.Path(f"{regions_path(prefix)}.tmp"))
                         if regions is not None else None)
        self.records = self.captioned = 0
        self.shard_records: list[int] = []

    def new_shard(self) -> None:
        self.shard_records.append(0)

    def add(self, key: str, name: str, caption: str | None,
            regions: regions_lib.Regions | None = None, image_class: str | None = None) -> None:
        """Record `key` (its `name`, `caption`, `regions`, and `image_class`: the name of the
        class sub-folder it sits in; ids are given in the order classes are met)."""
        label = -1 if image_class is None else self.class_names.setdefault(
            image_class, len(self.class_names))
        self._classes.write(np.int32(label).astype("<i4").tobytes())
        self._offsets.write(np.int64(self._lines.tell()).astype("<i8").tobytes())
        line = {"record": self.records, "key": key, "name": name} | (
            {"caption": caption} if caption is not None else {})
        if self._regions is not None:
            fields = (regions or regions_lib.NONE).line()
            self._regions.add(key, fields)
            line |= fields
        self._lines.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
        self._hashes.write(record_keys.hashes([key]).tobytes())
        self.records += 1
        self.captioned += caption is not None
        self.shard_records[-1] += 1

    def finish(self, shards: list[str]) -> None:
        """The index of `shards` (their final names): files renamed into place, manifest last.
        Two records with one key raise record_keys.DuplicateKey, naming both, after the index is
        in place (nothing converted is lost: remove one of the two and `--reindex`, or convert
        again)."""
        self._offsets.write(np.int64(self._lines.tell()).astype("<i8").tobytes())
        size = self._lines.tell()
        for f, path in self._files():
            f.close()
            os.replace(f"{path}.tmp", path)
        self._classes.close()
        if self.class_names:
            os.replace(f"{classes_path(self.prefix)}.tmp", classes_path(self.prefix))
        else:  # no class sub-folders: no table (and an --overwrite's old one goes)
            pathlib.Path(f"{classes_path(self.prefix)}.tmp").unlink()
            classes_path(self.prefix).unlink(missing_ok=True)
        if self._regions is None:
            regions_path(self.prefix).unlink(missing_ok=True)  # an --overwrite's old table
        write_manifest(self.prefix, shards, self.shard_records, self.captioned, size,
                       regions=None if self._regions is None
                       else self.regions | self._regions.info(),
                       classes=list(self.class_names) or None)
        check_unique(self.prefix)

    def _files(self):
        yield from ((self._lines, self.lines_path), (self._offsets, self.offsets_path),
                    (self._hashes, self.hashes_path))
        if self._regions is not None:
            yield self._regions.file, regions_path(self.prefix)

    def abandon(self) -> None:
        for f, path in self._files():
            f.close()
            pathlib.Path(f"{path}.tmp").unlink(missing_ok=True)
        self._classes.close()
        pathlib.Path(f"{classes_path(self.prefix)}.tmp").unlink(missing_ok=True)


def write_manifest(prefix, shards: list[str], counts: list[int], captioned: int,
                   lines_bytes: int, regions: dict | None = None,
                   classes: list[str] | None = None) -> None:
    write_json_atomic(paths(prefix)[2], {
        "format": FORMAT, "records": int(sum(counts)), "captioned": int(captioned),
        "lines_bytes": int(lines_bytes), "keys": True,
        "shards": [{"file": pathlib.Path(s).name, "records": int(n),
                    "bytes": pathlib.Path(s).stat().st_size} for s, n in zip(shards, counts)]}
        | ({"regions": regions} if regions is not None else {})
        | ({"classes": classes} if classes else {}))


def check_unique(prefix) -> None:
    """Every key of the output once (a sorted key table built on the side, in bounded memory,
    then removed); a duplicate names both records."""
    index = Index(prefix)
    table = pathlib.Path(f"{prefix}.index.keys-check.npy")
    try:
        record_keys.build(table, [index.hashes()], index.records, what=f"{index.lines_path}",
                          describe=lambda r: f"record {r} ({index.line(r)['name']!r}, key "
                                          f"{index.line(r)['key']!r})")
    except record_keys.DuplicateKey as e:  # the same error, with the fix for convert's output
        raise record_keys.DuplicateKey(f"{e}: remove one of the two images from the input and "
                                       "convert again with --overwrite", e.rows) from None
    finally:
        table.unlink(missing_ok=True)


def reindex(prefix, shards: list[str], counts: list[int], key_of) -> dict:
    """The offsets table, key hashes and manifest of an existing PREFIX.index.jsonl (one pass
    over it). A line without a key (an older convert) gets `key_of(name)`; the lines are
    rewritten with their keys then."""
    lines_path, offsets_path, manifest_path = paths(prefix)
    keys_path, table_path = hashes_path(prefix), regions_path(prefix)
    if not lines_path.is_file():
        raise MissingFile(f"{lines_path} not found: --reindex needs convert's index")
    # Regions convert kept stay, their table remade from the lines (what made them is kept);
    # classes stay as they are (their table is not in the lines).
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    old = manifest.get("regions")
    table = _RegionTable(pathlib.Path(f"{table_path}.tmp"))
    records = captioned = 0
    with (open(lines_path, "rb") as lines, open(f"{lines_path}.tmp", "wb") as out,
          open(f"{offsets_path}.tmp", "wb") as offsets, open(f"{keys_path}.tmp", "wb") as hashed):
        for raw in lines:
            line = json.loads(raw)
            if "key" not in line:
                line = {"record": line["record"], "key": key_of(line["name"])} | line
                raw = (json.dumps(line, ensure_ascii=False) + "\n").encode()
            offsets.write(np.int64(out.tell()).astype("<i8").tobytes())
            out.write(raw)
            hashed.write(record_keys.hashes([line["key"]]).tobytes())
            table.add(line["key"], {k: line[k] for k in ("boxes", "texts", "region_ids",
                                                         "classes") if k in line})
            records += 1
            captioned += "caption" in line
        offsets.write(np.int64(out.tell()).astype("<i8").tobytes())
        size = out.tell()
    table.file.close()
    regions = (old or {}) | table.info() if old or table.counts[0] else None
    written = (lines_path, offsets_path, keys_path) + ((table_path,) if regions else ())
    if records != sum(counts):
        for path in (lines_path, offsets_path, keys_path, table_path):
            pathlib.Path(f"{path}.tmp").unlink()
        raise StaleIndex(f"{lines_path} lists {records:,} records but the shards hold "
                         f"{sum(counts):,}; it is stale: convert again with --overwrite")
    for path in written:
        os.replace(f"{path}.tmp", path)
    pathlib.Path(f"{table_path}.tmp").unlink(missing_ok=True)
    write_manifest(prefix, shards, counts, captioned, size, regions=regions,
                   classes=manifest.get("classes"))
    check_unique(prefix)
    return {"records": records, "captioned": captioned}


class Index:
    """Record i's key, name and caption by one seek (`line`), every key's hash memory-mapped
    (`hashes`); `shards`: {file name: (first record, records, bytes)} as convert wrote them."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        self.lines_path, self.offsets_path, manifest_path = paths(prefix)
        if not manifest_path.is_file():
            raise StaleIndex(
                f"{self.lines_path} has no offsets table (an older convert wrote it), so its "
                f"records cannot be looked up one by one; add it with `python -m "
                f"mlcd_jax.data.convert --reindex {self.prefix}` (one pass, nothing re-encoded)")
        m = json.loads(manifest_path.read_text())
        self.records, self.captioned = int(m["records"]), int(m["captioned"])
        self.keyed = bool(m.get("keys"))
        self.regions = m.get("regions")  # what made the records' regions (None: no regions)
        self.classes = m.get("classes")  # the class sub-folders' names (None: no classes)
        if (not self.lines_path.is_file() or self.lines_path.stat().st_size != m["lines_bytes"]
                or not self.offsets_path.is_file()
                or self.offsets_path.stat().st_size != 8 * (self.records + 1)):
            raise StaleIndex(f"{manifest_path} does not match {self.lines_path} and "
                             f"{self.offsets_path} beside it; convert again with --overwrite, "
                             f"or `--reindex {self.prefix}`")
        first = np.concatenate([[0], np.cumsum([s["records"] for s in m["shards"]])])
        self.shards = {s["file"]: (int(f), int(s["records"]), int(s["bytes"]))
                       for s, f in zip(m["shards"], first)}
        self._opened = None  # (offsets, lines file), once read

    def line(self, record: int) -> dict:
        opened = self._opened
        if opened is None:  # opened lazily: again in each grain worker process
            # One tuple, read once: threads racing here each keep the file they read through
            # alive (a file replaced under another thread would close its descriptor mid-read).
            opened = self._opened = (np.memmap(self.offsets_path, dtype="<i8", mode="r"),
                                     open(self.lines_path, "rb"))
        offsets, file = opened
        start, end = int(offsets[record]), int(offsets[record + 1])
        # A positional read: grain's reading threads share this file, never its position.
        return json.loads(os.pread(file.fileno(), end - start, start))

    def hashes(self) -> np.ndarray:
        """Every record's key hash (`keys.HASH`), memory-mapped, in record order."""
        path = hashes_path(self.prefix)
        if not self.keyed:
            raise StaleIndex(f"{self.lines_path} has no record keys (an older convert wrote it), "
                             f"so labels cannot be joined to its records by key; add them with "
                             f"`python -m mlcd_jax.data.convert --reindex {self.prefix}` (one "
                             f"pass, nothing re-encoded)")
        if not path.is_file() or path.stat().st_size != record_keys.HASH.itemsize * self.records:
            raise StaleIndex(f"{path} is missing or does not match {self.lines_path}; "
                             f"`python -m mlcd_jax.data.convert --reindex {self.prefix}`")
        return np.memmap(path, dtype=record_keys.HASH, mode="r", shape=(self.records,))

    def labels(self) -> np.ndarray:
        """Every record's class (int32, -1: none), memory-mapped, in record order."""
        path = classes_path(self.prefix)
        if not path.is_file() or path.stat().st_size != 4 * self.records:
            raise StaleIndex(f"{path} is missing or does not match {self.lines_path}; convert "
                             "again with --overwrite")
        return np.memmap(path, dtype="<i4", mode="r", shape=(self.records,))

    def region_counts(self, records) -> np.ndarray:
        """(n, 2) int64: the regions of `records`, all and those with a text (from the table, no
        line read)."""
        path = regions_path(self.prefix)
        if self.regions is None:
            raise StaleIndex(f"{self.lines_path} has no regions: convert with --regions "
                             "(a COCO-style .json, a .jsonl keyed by record key, a folder of "
                             "SA-1B per-image JSON, or 'beside')")
        if not path.is_file() or path.stat().st_size != 16 * (self.records + 1):
            raise StaleIndex(f"{path} is missing or does not match {self.lines_path}; "
                             f"`python -m mlcd_jax.data.convert --reindex {self.prefix}`")
        table = np.memmap(path, dtype="<i8", mode="r", shape=(self.records + 1, 2))
        records = np.asarray(records, np.int64)
        return np.asarray(table[records + 1] - table[records])

    def __getstate__(self):
        return self.__dict__ | {"_opened": None}
