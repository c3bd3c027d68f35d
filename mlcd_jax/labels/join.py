"""A dataset's records joined with their rows of a label store, by key.

The label store's rows follow its embeddings (any order, any partitions: clip-retrieval's, our
`embed`'s); the dataset's records follow convert's (any number of prefixes read by one glob). Each
record's key (`data/sources.py`) is looked up in the store's sorted key table
(`mlcd_jax/data/record_keys.py`):

1. the dataset's own key table is built (bounded memory; a key on two records is an error naming
   both), then read in hash order against the store's table, so both are swept once;
2. `rows.npy`: each record's row of labels.npy, -1 where it has none (8 bytes a record);
3. cached in the store's directory (joins/) under the dataset's and the store's fingerprints, so a
   resumed run, LiT or `labels stats` reuse it; process 0 makes it while the others wait.

A record without a label is an error by default, naming how many and the first few keys;
`missing="skip"` leaves them out (counted). A label without a record is counted, never an error. A
store or a source without keys is joined by position (same count, same order), and said so.

`join_regions` does the same for regions (`data/regions.py`): each region's key f"{record
key}#{region id}" is looked up in a region label store (object regions' clusters from `labels
embed --regions` → kmeans → assign, or OCR regions' token ids from `labels ocr`), and a record's
regions come back with their label rows (`RecordRegions`); the regions a store should hold but
lacks are an error or skipped, as records are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import numpy as np
from tqdm import tqdm

from mlcd_jax.config.schema import MISSING
from mlcd_jax.data import record_keys, regions as regions_lib
from mlcd_jax.labels import store as store_lib
from mlcd_jax.runtime import distributed, files as records
from mlcd_jax.runtime.errors import UserError

CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Joined:
    """The records that have labels and where their labels are."""
    source: object                  # the dataset's records that have labels (all, or a Subset)
    store: store_lib.LabelStore
    rows: records.Mapped | None     # per record of `source`: its row of labels.npy (None: same)
    how: str                        # for the start line
    missing: int = 0                # records left out for want of labels
    unused: int = 0                 # label rows no record has


def join(source, store: store_lib.LabelStore, *, missing: str = "error",
         field: str = "config.data") -> Joined:
    """`source` joined with `store` (see the module's docstring)."""
    if missing not in MISSING:
        raise UserError(f"{field}.missing_labels must be one of {MISSING}, got {missing!r}")
    n, stored = len(source), len(store.labels)
    if store.keys_path is None:
        if n != stored:
            raise UserError(f"{store.path} labels {stored:,} examples but the dataset has {n:,}, "
                            "and the store has no keys to join them by; make the store from "
                            "keyed embeddings (`labels embed`, or clip-retrieval's metadata/)")
        return Joined(source, store, None,
                      f"by position ({store.path.parent} has no keys: made before keys or from "
                      "embeddings without them; rows are taken in record order)")
    if source.unkeyed is not None:
        raise UserError(f"{store.path.parent} joins labels by key, but the records of "
                        f"{field}.path have none: {source.unkeyed}")
    cache = _cache_dir(source, store)
    _made_once(cache, lambda aside: _build(source, store, aside))
    distributed.barrier("labels joined")
    summary = json.loads((cache / "join.json").read_text())
    rows = records.Mapped(cache / "rows.npy")
    how = (f"by key ({summary['matched']:,} of {n:,} records found in {store.path.parent}; "
           f"{summary['unused']:,} labels without a record)")
    if not summary["missing"]:
        return Joined(source, store, rows, how, 0, summary["unused"])
    shown = ", ".join(repr(k) for k in summary["first_missing"])
    if missing == "error":
        raise UserError(
            f"{summary['missing']:,} of {n:,} records of {field}.path have no labels in "
            f"{store.path.parent} (keys {shown}{' …' if summary['missing'] > 5 else ''}): embed "
            f"and assign them, or set {field}.missing_labels=skip to train without them")
    kept, kept_rows = _kept(cache, rows, summary["matched"])
    from mlcd_jax.data import sources
    return Joined(sources.Subset(source, kept), store, kept_rows,
                  f"{how}; {summary['missing']:,} records without labels skipped ({shown}"
                  f"{' …' if summary['missing'] > 5 else ''})", summary["missing"],
                  summary["unused"])


def _made_once(cache: pathlib.Path, build) -> None:
    """`build(directory)` on process 0 unless `cache` holds a finished join (its rows.npy
    recorded): made aside and renamed into place, so two jobs joining at once never mix their
    files, and a failed build (a duplicate key) leaves nothing behind."""
    if jax.process_index() != 0 or records.piece_record(cache / "rows.npy") is not None:
        return
    aside = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        build(aside)
    finally:
        if not (aside / "rows.npy").is_file():
            shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)  # an unfinished one (no record of rows.npy)
    try:
        aside.rename(cache)
    except OSError:  # another job finished the same join first: its files are as good
        shutil.rmtree(aside, ignore_errors=True)


def _sweep(ours: np.ndarray, theirs: np.ndarray, rows: np.ndarray, bar=None) -> int:
    """Each entry of the key table `ours` looked up in `theirs`, in hash order (both tables are
    read front to back): rows[its row] = the row found there (-1: none). Returns how many were
    found."""
    matched = 0
    for start in range(0, len(ours), CHUNK):
        part = np.asarray(ours[start:start + CHUNK])
        found = record_keys.lookup(theirs, part)
        rows[part["row"]] = found
        matched += int((found >= 0).sum())
        if bar is not None:
            bar.update(len(part))
    return matched


def _cache_dir(source, store) -> pathlib.Path:
    table = store.keys_path.stat()
    return store.path.parent / "joins" / records.digest(
        source.fingerprint(), store.manifest, table.st_size, table.st_mtime_ns)


def _build(source, store, cache: pathlib.Path) -> None:
    """rows.npy and join.json in `cache` (see the module's docstring)."""
    n = len(source)
    cache.mkdir(parents=True)
    bar = tqdm(total=2 * n, desc="labels: joining records by key", unit="key", unit_scale=True,
               disable=n < CHUNK)
    def hashed():
        for start in range(0, n, CHUNK):
            yield source.key_hashes(np.arange(start, min(n, start + CHUNK)))
            bar.update(min(CHUNK, n - start))
    describe = lambda r: f"record {r} ({source.name(r)}, key {source.key(r)!r})"
    ours = record_keys.build(cache / "records.keys.npy", hashed(), n, describe=describe,
                             what="the records of the dataset")
    theirs = store.keys()
    rows = np.lib.format.open_memmap(cache / "rows.npy.tmp", "w+", np.int64, (n,))
    matched = _sweep(ours, theirs, rows, bar)
    bar.close()
    rows.flush()
    del rows, ours
    (cache / "records.keys.npy").unlink()
    rows = np.load(cache / "rows.npy.tmp", mmap_mode="r")
    first_missing = []
    for start in range(0, n, CHUNK):  # the first few records without labels, in record order
        if len(first_missing) >= 5:
            break
        lacking = np.flatnonzero(rows[start:start + CHUNK] < 0)[:5 - len(first_missing)]
        first_missing += [source.key(int(start + r)) for r in lacking]
    del rows
    records.write_json_atomic(cache / "join.json", {
        "records": n, "matched": matched, "missing": n - matched,
        "unused": len(theirs) - matched, "first_missing": first_missing})
    pathlib.Path(cache / "rows.npy.tmp").replace(cache / "rows.npy")
    records.record_piece(cache / "rows.npy", {"records": n})


def _kept(cache: pathlib.Path, rows: records.Mapped, matched: int):
    """(record indices, their rows) of the records that have labels, on disk (made once)."""
    paths = cache / "kept.npy", cache / "kept_rows.npy"
    if jax.process_index() == 0 and not all(records.piece_record(p) for p in paths):
        out = [np.lib.format.open_memmap(f"{p}.tmp", "w+", np.int64, (matched,)) for p in paths]
        done, array = 0, rows.array()
        for start in range(0, len(array), CHUNK):
            part = np.asarray(array[start:start + CHUNK])
            have = np.flatnonzero(part >= 0)
            out[0][done:done + len(have)] = start + have
            out[1][done:done + len(have)] = part[have]
            done += len(have)
        for o in out:
            o.flush()
        del out
        for p in paths:
            pathlib.Path(f"{p}.tmp").replace(p)
            records.record_piece(p, {})
    distributed.barrier("labels: records with labels listed")
    return records.Mapped(paths[0]), records.Mapped(paths[1])


# --- regions ------------------------------------------------------------------------------------

EXPECT = ("objects", "text", "all")


@dataclasses.dataclass(frozen=True)
class RecordRegions:
    """One record's regions with their rows of a region label store: what a region head trains
    on. `labels[j]` is region j's labels (-1 where the store has none for it: e.g. an object
    store has none for OCR regions), in the record's own order of regions."""
    boxes: np.ndarray     # (n, 4) float32 [x0, y0, x1, y1], pixels of the decoded image
    texts: tuple          # (n,) the OCR regions' texts, None for object regions
    ids: np.ndarray       # (n,) int32: each region's id (its key is f"{record key}#{id}")
    labels: np.ndarray    # (n, l) int32
    labelled: np.ndarray  # (n,) bool: the store has the region
    rows: np.ndarray      # (n,) int64: each region's row of the store's labels.npy (-1: none)


class JoinedRegions:
    """A dataset's regions joined with a region label store by key (`join_regions`): call it
    with a record index for that record's `RecordRegions`. Everything stays memory-mapped (it
    pickles as paths: grain's workers map the same files)."""

    def __init__(self, source, store: store_lib.LabelStore, cache: pathlib.Path, summary: dict,
                 how: str):
        self.source, self.how, self.summary = source, how, summary
        self.num_labels, self.num_classes = store.labels.shape[1], store.num_classes
        self.labels = records.Mapped(store.path)
        self.offsets = records.Mapped(cache / "offsets.npy")
        self.rows = records.Mapped(cache / "rows.npy")

    def __call__(self, i: int) -> RecordRegions:
        regions = self.source.regions(i)
        start = int(self.offsets[i])
        rows = np.asarray(self.rows[start:start + len(regions)])
        have = rows >= 0
        labels = np.full((len(regions), self.num_labels), -1, np.int32)
        labels[have] = self.labels.array()[rows[have]]
        return RecordRegions(regions.boxes, regions.texts, regions.ids, labels, have, rows)


def join_regions(source, store: store_lib.LabelStore, *, expect: str | None = None,
                 missing: str = "error", field: str = "config.data") -> JoinedRegions:
    """`source`'s regions joined with `store`'s rows by their keys f"{record key}#{region id}",
    as `join` joins records: a sorted key table of the regions built in bounded memory, swept
    against the store's, each region's row written to a cache in the store's directory (joins/).

    `expect`: which regions the store should hold (default: "text" for an OCR store, "objects"
    for one made by `labels embed --regions`). An expected region without labels is an error
    naming how many and the first keys, unless `missing="skip"` (counted; its labels are -1, so a
    head ignores it); any region the store lacks reads as -1; labels without a region are counted.
    """
    if missing not in MISSING:
        raise UserError(f"{field}.missing_labels must be one of {MISSING}, got {missing!r}")
    kind = (store.manifest.get("regions") or {}).get("kind")
    expect = expect or ("text" if kind == "ocr" else "objects")
    if expect not in EXPECT:
        raise ValueError(f"expect must be one of {EXPECT}, got {expect!r}")
    why = getattr(source, "no_regions", "this source has no boxes")
    if why is not None:
        raise UserError(f"{store.path.parent} labels regions, but the records of {field}.path "
                        f"have none: {why}")
    if store.keys_path is None:
        raise UserError(f"{store.path.parent} has no keys, so its rows cannot be matched to "
                        "regions; make it from `labels embed --regions` (or `labels ocr`)")
    if source.unkeyed is not None:
        raise UserError(f"{store.path.parent} joins regions by key, but the records of "
                        f"{field}.path have none: {source.unkeyed}")
    table = store.keys_path.stat()
    cache = store.path.parent / "joins" / ("regions-" + records.digest(
        source.fingerprint(), source.regions_fingerprint(), store.manifest, table.st_size,
        table.st_mtime_ns, expect))
    _made_once(cache, lambda aside: _build_regions(source, store, aside, expect))
    distributed.barrier("regions joined")
    summary = json.loads((cache / "join.json").read_text())
    what = {"objects": "object regions", "text": "text regions", "all": "regions"}[expect]
    how = (f"regions by key ({summary['matched']:,} of {summary['expected']:,} {what} found in "
           f"{store.path.parent}; {summary['unused']:,} labels without a region)")
    if summary["missing"]:
        shown = ", ".join(repr(k) for k in summary["first_missing"])
        more = " …" if summary["missing"] > len(summary["first_missing"]) else ""
        if missing == "error":
            raise UserError(
                f"{summary['missing']:,} of {summary['expected']:,} {what} of {field}.path have "
                f"no labels in {store.path.parent} (keys {shown}{more}): label them (`labels "
                f"embed --regions` then assign, or `labels ocr`), or set "
                f"{field}.missing_labels=skip to train without them")
        how += f"; {summary['missing']:,} {what} without labels skipped ({shown}{more})"
    return JoinedRegions(source, store, cache, summary, how)


def _region_hashes(source, offsets: np.ndarray, texted: np.ndarray, bar, rows: int = CHUNK):
    """The key hashes of every region of `source` in order (~`rows` regions a chunk); fills
    `texted` (each region's having a text) on the way."""
    n, done, keys_ = len(source), 0, []
    for start in range(0, n, 1 << 16):
        indices = np.arange(start, min(n, start + (1 << 16)))
        for i in indices[offsets[indices + 1] > offsets[indices]]:
            regions = source.regions(int(i))
            texted[offsets[i]:offsets[i] + len(regions)] = regions.texted
            keys_ += regions.keys(source.key(int(i)))
            if len(keys_) >= rows:
                yield record_keys.hashes(keys_)
                done += len(keys_)
                keys_ = []
        bar.update(len(indices))
    if keys_:
        yield record_keys.hashes(keys_)


def _build_regions(source, store, cache: pathlib.Path, expect: str) -> None:
    """offsets.npy, rows.npy and join.json of a region join in `cache`."""
    cache.mkdir(parents=True)
    offsets = regions_lib.region_offsets(source, cache / "offsets.npy", "all").array()
    total = int(offsets[-1])
    texted = np.lib.format.open_memmap(cache / "texted.npy", "w+", bool, (max(total, 1),))
    bar = tqdm(total=len(source), desc="labels: joining regions by key", unit="record",
               unit_scale=True, disable=len(source) < CHUNK)
    hashed = _region_hashes(source, offsets, texted, bar)
    ours = record_keys.build(cache / "regions.keys.npy", hashed, total,
                             describe=lambda r: f"region {r}", what="the regions of the dataset")
    bar.close()
    theirs = store.keys()
    rows = np.lib.format.open_memmap(cache / "rows.npy.tmp", "w+", np.int64, (max(total, 1),))
    rows[:] = -1
    matched = _sweep(ours, theirs, rows)
    expected = missing = 0
    first_missing: list[str] = []
    for start in range(0, total, CHUNK):
        want = {"all": np.ones(min(CHUNK, total - start), bool),
                "text": texted[start:start + CHUNK],
                "objects": ~texted[start:start + CHUNK]}[expect]
        lacking = np.flatnonzero(want & (rows[start:start + CHUNK] < 0))
        expected += int(want.sum())
        missing += len(lacking)
        for r in lacking[:5 - len(first_missing)] + start:
            i = int(np.searchsorted(offsets, r, side="right")) - 1
            first_missing.append(regions_lib.region_key(
                source.key(i), int(source.regions(i).ids[r - offsets[i]])))
    rows.flush()
    del rows, ours, texted
    for f in ("regions.keys.npy", "texted.npy"):
        (cache / f).unlink()
    records.write_json_atomic(cache / "join.json", {
        "regions": total, "expected": expected, "matched": matched, "missing": missing,
        "unused": len(theirs) - matched, "first_missing": first_missing, "expect": expect})
    pathlib.Path(cache / "rows.npy.tmp").replace(cache / "rows.npy")
    records.record_piece(cache / "rows.npy", {"regions": total})
