"""Regions as data: boxes (and the text of OCR regions) per record, found by key.

RICE (Xie et al., ICCV 2025, arXiv 2507.20025) trains on regions beside whole images: object
regions (SAM's boxes, kept where the shortest side is at least 128 px at its images' resolution;
each labelled by its nearest center of a k-means over the teacher's region features) and OCR
regions (PaddleOCR's text boxes, labelled by their text's token ids). This module reads boxes from
the forms they come in, matches them to records by key, drops the boxes that cannot be used
(counted, the first few named) and gives each record's regions as `Regions`. A region with a text
is an OCR region, one without an object region (the paper's two kinds).

`--regions` names one of:

* a COCO-style annotation JSON (`*.json`): images[] (id, file_name, width?, height?) and
  annotations[] (image_id, bbox [x, y, w, h], a text in "utf8_string", "text" or "caption" for
  COCO-Text-like data); also the id-keyed form of COCO-Text v2 and TextOCR ("imgs", "anns").
  Read as a stream by ijson (`_members`): memory holds one annotation, whatever the file's size;
  the annotations are grouped by image through bucket files on disk.
* a folder of SA-1B-style per-image JSON ({"image": {"file_name", "width", "height", ...},
  "annotations": [{"bbox": [x, y, w, h], ...}]}), every *.json under it; or `beside`: each
  image's own JSON (KEY.json beside KEY.jpg in a folder, the sample's .json in a tar, as SA-1B
  ships them).
* JSON lines keyed by record key (`*.jsonl`): {"key", "boxes": [[x0, y0, x1, y1], ...],
  "texts"?: [...], "size"?: [w, h]}.

Matching: an annotation's image name (COCO's file_name, SA-1B's folder + file_name, the line's
key) finds the record whose key, or (in a tar) member path, is that name or ends with "/" + that
name, with or without the file's extension; the longest such name wins (`candidates`). Two records
that match one annotated image are an error naming both (give the annotation's names with their
folders); annotated images without a record are counted.

Boxes are [x0, y0, x1, y1] in pixels of the image as decoded (EXIF orientation applied, as every
stage here sees it). An annotation that gives its image's size for an image stored at another size
(img2dataset resizes) has its boxes scaled when the aspect ratios agree within 1 %, else all its
boxes are dropped. Then a box is dropped when it is not 4 finite numbers, empty, outside the image
by more than 1 px (within that, clipped), or has a side under max(min_side, min_fraction × the
image's shorter side) (defaults 2 px and 1/16: one patch of a /16 ViT when the image fills its
input; the paper's rule is --min_region_side 128 --min_region_fraction 0).

A region is found by (record key, region id), never by position: its id is its place among its
image's annotations as the annotation source lists them, kept when boxes before it are dropped, so
its key f"{record key}#{id}" names the same box whatever the thresholds.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import math
import operator
import os
import pathlib
import shutil
import threading
from collections.abc import Iterator

import ijson
import numpy as np
from PIL import Image
from tqdm import tqdm

from mlcd_jax.data import record_keys, transforms
from mlcd_jax.runtime import files as records
from mlcd_jax.runtime.errors import MissingFile, UserError

BESIDE = "beside"
TEXT_FIELDS = ("utf8_string", "text", "caption")
KINDS = ("objects", "text", "all")  # object regions (no text), OCR regions (a text), both
TOLERANCE = 1.0  # px a box may pass the image's edge by (rounding in exporters); clipped
SHOWN = 5  # boxes, keys or names shown in a line; the rest are counted
CHUNK = 1 << 20  # records (or annotated images) read at once where all are swept


@dataclasses.dataclass(frozen=True)
class Rules:
    """Which boxes are kept (see the module's docstring)."""
    min_side: float = 2.0
    min_fraction: float = 1 / 16

    def minimum(self, width: int, height: int) -> float:
        return max(self.min_side, self.min_fraction * min(width, height))


@dataclasses.dataclass(frozen=True)
class Regions:
    """A record's regions: boxes (n, 4) float32 [x0, y0, x1, y1] in pixels of the decoded image,
    each one's text (None: an object region), id (its place in the annotation source) and class
    (int32, -1: unknown; COCO's category_id mapped to 0..C-1 in sorted id order, a JSON-lines
    "classes"; the names are in the index's "regions" summary, `classes`)."""
    boxes: np.ndarray
    texts: tuple
    ids: np.ndarray
    classes: np.ndarray | None = None  # None: all unknown (-1)

    def __post_init__(self):
        classes = (np.full(len(self.boxes), -1, np.int32) if self.classes is None
                   else np.asarray(self.classes, np.int32).reshape(-1))
        object.__setattr__(self, "classes", classes)

    def __len__(self):
        return len(self.boxes)

    @property
    def texted(self) -> np.ndarray:
        """(n,) bool: which regions have a text (OCR regions)."""
        return np.array([t is not None for t in self.texts], bool)

    def of_kind(self, kind: str) -> Regions:
        """The object regions (`objects`), the OCR regions (`text`) or all."""
        if kind == "all":
            return self
        keep = self.texted if kind == "text" else ~self.texted
        return Regions(self.boxes[keep], tuple(t for t, k in zip(self.texts, keep) if k),
                       self.ids[keep], self.classes[keep])

    def keys(self, record_key: str) -> list[str]:
        return [region_key(record_key, int(i)) for i in self.ids]

    def line(self) -> dict:
        """The fields of an index line (nothing for none; texts and ids only where needed)."""
        if not len(self):
            return {}
        out = {"boxes": self.boxes.astype(np.float64).round(2).tolist()}
        if any(t is not None for t in self.texts):
            out["texts"] = list(self.texts)
        if not np.array_equal(self.ids, np.arange(len(self))):
            out["region_ids"] = self.ids.tolist()
        if (self.classes >= 0).any():  # last, and only then: lines without classes as before
            out["classes"] = self.classes.tolist()
        return out

    @staticmethod
    def of_line(line: dict) -> Regions:
        boxes = np.asarray(line.get("boxes", []), np.float32).reshape(-1, 4)
        texts = tuple(line.get("texts", [None] * len(boxes)))
        ids = np.asarray(line.get("region_ids", range(len(boxes))), np.int32)
        return Regions(boxes, texts, ids, line.get("classes"))


NONE = Regions(np.zeros((0, 4), np.float32), (), np.zeros(0, np.int32))


def region_key(record_key: str, region_id: int) -> str:
    """What a region's embedding and labels are found by."""
    return f"{record_key}#{region_id}"


# --- annotations as read, before cleaning -------------------------------------------------------

@dataclasses.dataclass
class Raw:
    """An annotated image as its source says: its name, its size (if given), boxes (n, 4) float64
    [x0, y0, x1, y1] (NaN rows: malformed), texts and classes (-1: none), in the source's order."""
    key: str
    boxes: np.ndarray
    texts: list
    size: tuple[int, int] | None
    where: str
    classes: list | None = None  # None: every box's class unknown

    def __post_init__(self):
        if self.classes is None:
            self.classes = [-1] * len(self.boxes)

    def line(self) -> dict:
        return {"key": self.key, "boxes": self.boxes.tolist(), "texts": self.texts,
                "size": self.size, "where": self.where, "classes": self.classes}

    @staticmethod
    def of_line(line: dict) -> Raw:
        return Raw(line["key"], np.asarray(line["boxes"], np.float64).reshape(-1, 4),
                   line["texts"], tuple(line["size"]) if line["size"] else None, line["where"],
                   line["classes"])


def _numbers(box, n: int = 4) -> list[float] | None:
    if isinstance(box, (str, bytes, dict)):
        return None
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _xywh(box) -> list[float]:
    v = _numbers(box)
    return [math.nan] * 4 if v is None else [v[0], v[1], v[0] + v[2], v[1] + v[3]]


def _xyxy(box) -> list[float]:
    v = _numbers(box)
    return [math.nan] * 4 if v is None else v


def _text(annotation: dict) -> str | None:
    for field in TEXT_FIELDS:
        value = annotation.get(field)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _size(width, height) -> tuple[int, int] | None:
    try:
        size = int(width), int(height)
    except (TypeError, ValueError):
        return None
    return size if min(size) > 0 else None


def _name(key: str) -> str:
    return str(key).replace("\\", "/").removeprefix("./").lstrip("/")


def sa1b(obj, where: str, folder: str = "") -> Raw | None:
    """An SA-1B-style per-image JSON object (None: not one, e.g. img2dataset's metadata)."""
    if not (isinstance(obj, dict) and isinstance(obj.get("annotations"), list)
            and isinstance(obj.get("image"), dict)):
        return None
    image = obj["image"]
    anns = [a for a in obj["annotations"] if isinstance(a, dict)]
    file_name = image.get("file_name") or pathlib.Path(where).stem
    return Raw(_name(f"{folder}/{file_name}" if folder else file_name),
               np.array([_xywh(a.get("bbox")) for a in anns], np.float64).reshape(-1, 4),
               [_text(a) for a in anns], _size(image.get("width"), image.get("height")), where)


def _read_sa1b_folder(folder: pathlib.Path) -> Iterator[Raw]:
    files = sorted(folder.rglob("*.json"))
    if not files:
        raise MissingFile(f"--regions {folder}: no .json files (SA-1B's per-image JSON) "
                          "under it")
    for path in tqdm(files, desc="regions: reading per-image JSON", unit="file"):
        try:
            obj = json.loads(path.read_bytes())
        except ValueError as e:
            raise UserError(f"{path}: not JSON ({e}); fix or remove that file") from None
        rel = path.parent.relative_to(folder).as_posix()
        raw = sa1b(obj, str(path), "" if rel == "." else rel)
        if raw is not None:
            yield raw


def _read_jsonl(path: pathlib.Path) -> Iterator[Raw]:
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(tqdm(f, desc="regions: reading JSON lines", unit="line"), 1):
            if not text.strip():
                continue
            where = f"{path}:{n}"
            try:
                line = json.loads(text)
            except ValueError as e:
                raise UserError(f"{where}: not JSON ({e}); each line is {{\"key\", \"boxes\": "
                                "[[x0, y0, x1, y1], ...], \"texts\"?}") from None
            if not isinstance(line, dict) or "key" not in line or not isinstance(
                    line.get("boxes"), list):
                raise UserError(f"{where}: needs \"key\" (the record's key) and \"boxes\" (a "
                                "list of [x0, y0, x1, y1])")
            texts = line.get("texts", [None] * len(line["boxes"]))
            if not isinstance(texts, list) or len(texts) != len(line["boxes"]):
                raise UserError(f"{where}: \"texts\" must list one text (or null) per box; "
                                f"it has {len(texts) if isinstance(texts, list) else texts!r} "
                                f"for {len(line['boxes'])} boxes")
            classes = line.get("classes", [None] * len(line["boxes"]))
            if not (isinstance(classes, list) and len(classes) == len(line["boxes"]) and all(
                    c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= -1)
                    for c in classes)):
                raise UserError(f"{where}: \"classes\" must list one class per box: an integer "
                                f"≥ 0, or null (or -1) where unknown; got {classes!r:.80} for "
                                f"{len(line['boxes'])} boxes")
            size = line.get("size")
            yield Raw(_name(line["key"]),
                      np.array([_xyxy(b) for b in line["boxes"]], np.float64).reshape(-1, 4),
                      [t.strip() if isinstance(t, str) and t.strip() else None for t in texts],
                      _size(*size) if isinstance(size, list) and len(size) == 2 else None, where,
                      [-1 if c is None else c for c in classes])


# --- COCO-style JSON, streamed ------------------------------------------------------------------

READ_SIZE = 1 << 12  # bytes ijson reads at a time: a parse error lies in the last read
IMAGES, ANNOTATIONS = ("images", "imgs"), ("annotations", "anns", "categories", "cats")


class _Counted:
    """A binary file whose reads advance a tqdm bar of bytes and are counted (to place an
    error)."""

    def __init__(self, f, bar):
        self.f, self.bar, self.count = f, bar, 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.count += len(data)
        self.bar.update(len(data))
        return data


def _parsed(path: pathlib.Path, bar, parse, *args):
    """What ijson's `parse` (parse, items or kvitems of the fastest backend installed: yajl2_c
    where it is) gives for the file read through `bar`, with numbers as json gives them (int, else
    float); malformed or cut-short JSON as one line naming the file and about where."""
    with open(path, "rb") as f:
        counted = _Counted(f, bar)
        try:
            yield from parse(counted, *args, buf_size=READ_SIZE, use_float=True)
        except ijson.JSONError as e:
            raise UserError(f"{path}: malformed JSON near byte {counted.count:,} ({_why(e)}); "
                            "is it COCO-style annotation JSON?") from None


def _why(e: Exception) -> str:
    """ijson's message in one line: yajl's first line and the text it quotes around the place."""
    why = e.args[0] if e.args else ""
    if isinstance(why, bytes):  # yajl's, where the text it quotes is not UTF-8
        why = why.decode(errors="replace")
    lines = str(why).strip().splitlines() or [type(e).__name__]
    return lines[0] + (f" at {lines[1].strip()!r}" if len(lines) > 2 and lines[1].strip() else "")


def _bar(path: pathlib.Path, desc: str, passes: int = 1):
    return tqdm(total=path.stat().st_size * passes, desc=desc, unit="B", unit_scale=True)


def _layout(path: pathlib.Path, names: tuple[str, ...]) -> list[tuple[str, bool]]:
    """(name, whether it is an id-keyed object) of every top-level array or object named in
    `names`, in the file's order, from one pass of ijson's events (those of other prefixes
    dropped in C: the annotations' own events never reach Python)."""
    found = []
    with _bar(path, "regions: COCO layout") as bar:
        events, prefixes = itertools.tee(_parsed(path, bar, ijson.parse))
        kept = map({"", *names}.__contains__, map(operator.itemgetter(0), prefixes))
        selected = itertools.compress(events, kept)
        if next(selected)[1] != "start_map":
            raise UserError(f"{path}: expected '{{' at its start (a JSON object); is it "
                            "COCO-style annotation JSON?")
        for prefix, event, _ in selected:
            if prefix and event in ("start_array", "start_map"):
                form = prefix, event == "start_map"
                if form not in found:
                    found.append(form)
    return found


def _members(path: pathlib.Path, layout: list[tuple[str, bool]], desc: str):
    """(top-level name, member id or None, value) of every element of the top-level arrays (or
    id-keyed objects) that `layout` names (`_layout`'s (name, id-keyed)), one pass of ijson's
    items (kvitems) over the file for each: memory holds one element."""
    with _bar(path, desc, len(layout)) as bar:
        for name, keyed in layout:
            if keyed:
                for member, value in _parsed(path, bar, ijson.kvitems, name):
                    yield name, member, value
            else:
                for value in _parsed(path, bar, ijson.items, f"{name}.item"):
                    yield name, None, value


BATCH = 1 << 16
IMAGES_PER_BUCKET = 1 << 16  # annotations are grouped by image a bucket of images at a time
_ROW = np.dtype([("image", "<i8"), ("box", "<f8", (4,)), ("text", "<i8"), ("category", "<i8")])
NO_CATEGORY = np.iinfo(np.int64).min  # an annotation without an integer category_id


class _Lines:
    """An append-only file of JSON lines with their offsets, read back by line number."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._out, self.count = open(path, "wb"), 0
        self._offsets_file = open(f"{path}.offsets", "wb")

    def add(self, obj) -> int:
        self._offsets_file.write(np.int64(self._out.tell()).tobytes())
        self._out.write((json.dumps(obj, ensure_ascii=False) + "\n").encode())
        self.count += 1
        return self.count - 1

    def get(self, i: int):
        """Line i of what is written so far."""
        self._out.flush()
        self._offsets_file.flush()
        offsets = np.append(np.fromfile(f"{self.path}.offsets", np.int64), self._out.tell())
        with open(self.path, "rb") as f:
            f.seek(int(offsets[i]))
            return json.loads(f.read(int(offsets[i + 1] - offsets[i])))

    def close(self):
        self._offsets_file.write(np.int64(self._out.tell()).tobytes())
        self._out.close()
        self._offsets_file.close()
        return _LineReader(self.path)


def _hash_chunks(path: pathlib.Path, chunk: int = 1 << 22):
    """A file of key hashes, read a memory-mapped chunk at a time."""
    if path.stat().st_size:
        hashed = np.memmap(path, record_keys.HASH, "r")
        yield from (hashed[s:s + chunk] for s in range(0, len(hashed), chunk))


class _LineReader:
    def __init__(self, path):
        self.path = path
        self.offsets = np.memmap(f"{path}.offsets", np.int64, "r")
        self._file = open(path, "rb")

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return json.loads(os.pread(self._file.fileno(), end - start, start))

    def close(self):
        self._file.close()
        del self.offsets


def _category(ann: dict) -> int:
    c = ann.get("category_id")
    if isinstance(c, float) and c.is_integer() or isinstance(c, str) and c.isdigit():
        c = int(c)  # 3.0, or an id-keyed object's "3"
    return c if isinstance(c, int) and not isinstance(c, bool) else NO_CATEGORY


def _read_coco(path: pathlib.Path, work: pathlib.Path, meta: dict) -> Iterator[Raw]:
    """The annotated images of a COCO-style file in its images' order, in bounded memory: the
    images listed with their ids' hashes (a sorted key table), the annotations streamed to bucket
    files by image, each bucket grouped alone. Each box's class is its category_id's place among
    the categories' ids sorted (those of `categories`, else those the annotations use); their
    names go into meta["classes"] before the first image is given."""
    layout = _layout(path, IMAGES + ANNOTATIONS)
    images, ids = _Lines(work / "images.jsonl"), open(work / "images.ids", "wb")
    for _, member, image in _members(path, [f for f in layout if f[0] in IMAGES],
                                     "regions: COCO images"):
        if not isinstance(image, dict) or image.get("file_name") is None:
            raise UserError(f"{path}: an entry of images has no file_name ({str(image)[:80]}); "
                            "each image needs id and file_name")
        image_id = image.get("id", member)
        images.add({"key": _name(image["file_name"]), "id": image_id,
                    "size": _size(image.get("width"), image.get("height"))})
        ids.write(record_keys.hashes([str(image_id)]).tobytes())
    ids.close()
    images = images.close()
    if not len(images):
        raise UserError(f"{path}: no images[] (or imgs{{}}) entries: not COCO-style annotation "
                        "JSON (images[].file_name/id, annotations[].image_id/bbox)")
    table = record_keys.build(work / "images.table.npy", _hash_chunks(work / "images.ids"),
                              len(images),
                           describe=lambda r: f"images entry {r} ({images[r]['key']!r})",
                           what=f"{path}: image ids")
    buckets = [open(work / f"bucket{b}", "wb")
               for b in range(-(-len(images) // IMAGES_PER_BUCKET))]
    texts = _Lines(work / "texts.jsonl")
    unknown, first_unknown, batch = 0, [], []
    categories: dict[int, str] = {}  # id → name, from the file's categories
    used: set[int] = set()  # the category ids the annotations name

    def flush():
        nonlocal unknown
        rows = record_keys.lookup(table, record_keys.hashes(str(a[0]) for a in batch))
        out = np.empty(len(batch), _ROW)
        out["image"], out["box"] = rows, [a[1] for a in batch]
        out["text"] = [texts.add(a[2]) if a[2] is not None else -1 for a in batch]
        out["category"] = [a[3] for a in batch]
        used.update(np.unique(out["category"]).tolist())
        missing = rows < 0
        unknown += int(missing.sum())
        first_unknown.extend(str(batch[i][0]) for i in np.flatnonzero(missing)[:SHOWN])
        out = out[~missing]
        which = out["image"] // IMAGES_PER_BUCKET
        for b in np.unique(which):
            buckets[b].write(out[which == b].tobytes())
        batch.clear()

    for name, member, ann in _members(path, [f for f in layout if f[0] in ANNOTATIONS],
                                      "regions: COCO annotations"):
        if name in ("categories", "cats"):
            c = _category({"category_id": ann.get("id", member)} if isinstance(ann, dict) else {})
            if c == NO_CATEGORY:
                raise UserError(f"{path}: an entry of {name} has no integer id "
                                f"({str(ann)[:80]}); each category needs id and name")
            categories.setdefault(c, str(ann.get("name", c)))
            continue
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise UserError(f"{path}: an annotation has no image_id ({str(ann)[:80]})")
        batch.append((ann["image_id"], _xywh(ann.get("bbox")), _text(ann), _category(ann)))
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    for f in buckets:
        f.close()
    texts = texts.close()
    if unknown:
        print(f"regions: {unknown:,} annotations in {path} name an image_id that its images do "
              f"not list (e.g. {', '.join(first_unknown[:SHOWN])}); left out")
    used.discard(NO_CATEGORY)
    ids = sorted(categories) if categories else sorted(used)
    meta["classes"] = [categories.get(c, str(c)) for c in ids] if ids else None
    lookup = np.asarray(ids, np.int64)
    strays = sorted(used - set(ids))
    if strays:
        print(f"regions: annotations in {path} name category ids that its categories do not list "
              f"({', '.join(map(str, strays[:SHOWN]))}{' …' if len(strays) > SHOWN else ''}); "
              "their class is unknown (-1)")

    def classes(category: np.ndarray) -> list[int]:
        place = np.searchsorted(lookup, category).clip(0, max(len(lookup) - 1, 0))
        found = (lookup[place] == category) if len(lookup) else np.zeros(len(category), bool)
        return np.where(found, place, -1).tolist()
    for b in range(len(buckets)):
        rows = np.fromfile(work / f"bucket{b}", _ROW)
        rows = rows[np.argsort(rows["image"], kind="stable")]  # file order kept within an image
        starts = np.flatnonzero(np.diff(rows["image"], prepend=-1))
        for group in np.split(rows, starts[1:]) if len(rows) else []:
            image = images[int(group["image"][0])]
            yield Raw(image["key"], group["box"].astype(np.float64),
                      [texts[int(t)] if t >= 0 else None for t in group["text"]],
                      tuple(image["size"]) if image["size"] else None,
                      f"{path} (image id {image['id']})", classes(group["category"]))
        (work / f"bucket{b}").unlink()
    images.close()
    texts.close()


# --- the table of annotated images, and matching records to it ---------------------------------

def candidates(key: str, name: str) -> list[str]:
    """The names a record answers to, longest first: its key's and (in a tar) its member path's
    trailing parts, each with and without the file's extension."""
    paths = [key]
    member = name.partition(".tar:")[2]
    if member:
        paths.append(member)
    found = []
    for path in paths:
        parts = path.split("/")
        for start in range(len(parts)):
            tail = "/".join(parts[start:])
            stem = tail.rsplit(".", 1)[0] if "." in parts[-1] else tail
            found.extend(c for c in (tail, stem) if c and c not in found)
    return sorted(found, key=lambda c: -len(c))  # the most specific name wins


class Table:
    """Annotated images on disk (a line each, their names' sorted key table), matched to records
    as they come; each remembers the record that claimed it (`claim`)."""

    classes = None  # the names of the boxes' classes, where the source names them (COCO)

    def __init__(self, work: pathlib.Path, raws: Iterator[Raw], what: str):
        self.what = what
        lines, hashes = _Lines(work / "table.jsonl"), open(work / "table.hashes", "wb")
        for raw in raws:
            lines.add(raw.line())
            hashes.write(record_keys.hashes([raw.key]).tobytes())
        hashes.close()
        self.lines = lines.close()
        n = len(self.lines)
        self.table = record_keys.build(
            work / "table.npy", _hash_chunks(work / "table.hashes"), n,
            describe=lambda r: f"{self.lines[r]['where']} ({self.lines[r]['key']!r})",
            what=f"{what}: the annotated images' names")
        self.claimed = np.lib.format.open_memmap(work / "claimed.npy", "w+", np.int64, (max(n, 1),))
        self.claimed[:] = -1
        self.claimers = _Lines(work / "claimers.jsonl")

    def __len__(self):
        return len(self.lines)

    def find(self, key: str, name: str) -> int:
        """The row of the record's annotated image (-1: none)."""
        names = candidates(key, name)
        rows = record_keys.lookup(self.table, record_keys.hashes(names))
        hit = np.flatnonzero(rows >= 0)
        return int(rows[hit[0]]) if hit.size else -1

    def claim(self, row: int, name: str) -> Raw:
        if self.claimed[row] >= 0:
            other = self.claimers.get(int(self.claimed[row]))
            raw = Raw.of_line(self.lines[row])
            raise UserError(f"{self.what}: the annotations of {raw.key!r} ({raw.where}) match "
                            f"two records, {other!r} and {name!r}; name the image with its "
                            "folder in the annotations (e.g. train2017/x.jpg), or convert each "
                            "folder on its own")
        self.claimed[row] = self.claimers.add(name)
        return Raw.of_line(self.lines[row])

    def unclaimed(self) -> tuple[int, list[str]]:
        """How many annotated images no record claimed, and the first few names."""
        count, first = 0, []
        for start in range(0, len(self), CHUNK):
            free = np.flatnonzero(self.claimed[start:min(len(self), start + CHUNK)] < 0)
            count += len(free)
            first += [self.lines[start + int(r)]["key"] for r in free[:SHOWN - len(first)]]
        return count, first

    def close(self):
        self.lines.close()
        self.claimers.close().close()
        del self.claimed


def open_source(spec: str, work: pathlib.Path):
    """The annotated images `spec` names (see the module's docstring), as a Table in `work`."""
    path = pathlib.Path(spec)
    if path.is_dir():
        return Table(work, _read_sa1b_folder(path), spec)
    if not path.is_file():
        raise MissingFile(f"--regions {spec}: no such file or folder (a COCO-style .json, "
                          "a .jsonl keyed by record key, a folder of SA-1B per-image JSON, "
                          f"or {BESIDE!r})")
    if path.suffix == ".jsonl":
        return Table(work, _read_jsonl(path), spec)
    meta = {}
    table = Table(work, _read_coco(path, work, meta), spec)
    table.classes = meta.get("classes")
    return table


# --- cleaning: what is kept, what is dropped and why --------------------------------------------

REASONS = {"malformed": "not 4 finite numbers", "empty": "empty",
           "outside": "outside the image", "small": "a side under the minimum",
           "size": "annotated for an image of another shape"}


def clean(raw: Raw, size: tuple[int, int], rules: Rules) -> tuple[Regions, list[tuple]]:
    """The boxes of `raw` that are kept on an image of `size` (w, h), and (reason, id, box) of
    each dropped one (see the module's docstring)."""
    w, h = size
    boxes = raw.boxes.copy()
    dropped, keep = [], np.ones(len(boxes), bool)
    if raw.size is not None and tuple(raw.size) != (w, h) and len(boxes):
        sx, sy = w / raw.size[0], h / raw.size[1]
        if abs(sx / sy - 1) > 0.01:
            return NONE, [("size", j, f"{raw.size[0]}×{raw.size[1]}") for j in range(len(boxes))]
        boxes *= [sx, sy, sx, sy]
    minimum = rules.minimum(w, h)
    for j, (x0, y0, x1, y1) in enumerate(boxes):
        reason = None
        if not np.isfinite([x0, y0, x1, y1]).all():
            reason = "malformed"
        elif x1 <= x0 or y1 <= y0:
            reason = "empty"
        elif x0 < -TOLERANCE or y0 < -TOLERANCE or x1 > w + TOLERANCE or y1 > h + TOLERANCE:
            reason = "outside"
        else:
            x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, w), min(y1, h)
            boxes[j] = x0, y0, x1, y1
            if min(x1 - x0, y1 - y0) < minimum:
                reason = "small"
        if reason:
            keep[j] = False
            dropped.append((reason, j, raw.boxes[j].round(2).tolist()))
    ids = np.flatnonzero(keep).astype(np.int32)
    return Regions(boxes[keep].round(2).astype(np.float32),
                   tuple(raw.texts[j] for j in ids), ids,
                   np.asarray(raw.classes, np.int32)[ids]), dropped


class Annotations:
    """What --regions names, opened: `of(key, name, size, sidecar)` gives each record its kept
    regions, counting what is dropped; `report()` says it in a few lines."""

    def __init__(self, spec: str, work: pathlib.Path, rules: Rules | None = None):
        self.spec, self.rules, self.work = spec, rules or Rules(), pathlib.Path(work)
        self.table = None
        if spec != BESIDE:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
            try:
                self.table = open_source(spec, self.work)
            except BaseException:
                shutil.rmtree(self.work, ignore_errors=True)
                raise
        self.kept = self.texted = self.records = self.total = 0
        self.top_class = -1  # the largest class a kept box has
        self.dropped: dict[str, int] = {}
        self.shown: list[str] = []

    def of(self, key: str, name: str, size: tuple[int, int] | None,
           sidecar: dict | None = None) -> Regions:
        if self.table is None:
            raw = sa1b(sidecar, name) if sidecar is not None else None
        else:
            row = self.table.find(key, name)
            raw = self.table.claim(row, name) if row >= 0 else None
        if raw is None or not len(raw.boxes):
            return NONE
        self.total += len(raw.boxes)
        if size is None:  # the image does not decode: the record is skipped anyway
            regions, dropped = NONE, []
        else:
            regions, dropped = clean(raw, size, self.rules)
        for reason, j, box in dropped:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            if len(self.shown) < SHOWN:
                shape = f" on {size[0]}×{size[1]}" if size else ""
                self.shown.append(f"{name} box {j} {box}{shape} ({REASONS[reason]})")
        self.kept += len(regions)
        self.texted += int(regions.texted.sum())
        self.top_class = max(self.top_class, int(regions.classes.max(initial=-1)))
        self.records += bool(len(regions))
        return regions

    def report(self, report=print, what: str = "regions") -> None:
        dropped = sum(self.dropped.values())
        if dropped:
            reasons = ", ".join(f"{REASONS[r]}: {n:,}" for r, n in self.dropped.items())
            minimum = (f"; the minimum side is max({self.rules.min_side:g} px, "
                       f"{self.rules.min_fraction:g} × the image's shorter side) "
                       "(--min_region_side, --min_region_fraction)"
                       if "small" in self.dropped else "")
            report(f"{what}: dropped {dropped:,} of {self.total:,} boxes ({reasons}): "
                   f"{'; '.join(self.shown)}{' …' if dropped > len(self.shown) else ''}"
                   f"{minimum}")
        if self.table is not None:
            free, names = self.table.unclaimed()
            if free:
                report(f"{what}: {free:,} of {len(self.table):,} annotated images in {self.spec} "
                       f"have no record (e.g. {', '.join(map(repr, names))}); left out")

    def classes(self) -> list[str] | None:
        """The names of the boxes' classes (class c is names[c]): the source's (COCO's
        categories), else the numbers up to the largest class a kept box has; None: no classes."""
        named = self.table.classes if self.table is not None else None
        return named or ([str(c) for c in range(self.top_class + 1)] if self.top_class >= 0
                         else None)

    def summary(self) -> dict:
        classes = self.classes()
        return {"source": self.spec, "regions": self.kept, "with_text": self.texted,
                "records": self.records, "dropped": dict(self.dropped),
                "min_side": self.rules.min_side, "min_fraction": self.rules.min_fraction} | (
                    {"classes": classes} if classes else {})

    def close(self):
        if self.table is not None:
            self.table.close()
            self.table = None
            shutil.rmtree(self.work, ignore_errors=True)


def image_size(data: bytes | str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of an image as `transforms.decode` shows it (EXIF orientation applied),
    from its header; None where it does not open."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            w, h = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # PIL raises many types for bad files: the record is skipped anyway
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# --- region crops: a source whose records are regions ------------------------------------------


def region_offsets(source, path: pathlib.Path, kind: str = "all") -> records.Mapped:
    """(N + 1,) int64: where each record's regions of `kind` start in the flat order of all
    records' regions (record order, then the record's own order), built from `region_counts` a
    chunk of records at a time into `path` and kept with a record of what made it."""
    if kind not in KINDS:
        raise UserError(f"region kind must be one of {KINDS}, got {kind!r}")
    made_by = records.digest(source.fingerprint(), source.regions_fingerprint(), kind)
    if (records.piece_record(path) or {}).get("fingerprint") != made_by:
        n = len(source)
        tmp = f"{path}.{os.getpid()}.tmp"  # the processes of a job may all make it: same bytes
        out = np.lib.format.open_memmap(tmp, "w+", np.int64, (n + 1,))
        out[0], total = 0, 0
        for start in tqdm(range(0, n, CHUNK), desc="regions: counting", unit="chunk",
                          disable=n < CHUNK):
            counts = source.region_counts(np.arange(start, min(n, start + CHUNK)))
            picked = {"all": counts[:, 0], "text": counts[:, 1],
                      "objects": counts[:, 0] - counts[:, 1]}[kind]
            out[start + 1:start + 1 + len(picked)] = total + np.cumsum(picked)
            total += int(picked.sum())
        out.flush()
        del out
        record = pathlib.Path(path).with_suffix(".json")
        pathlib.Path(f"{record}.{os.getpid()}.tmp").write_text(json.dumps({
            "fingerprint": made_by, "rows": n + 1,
            "sha256": records.array_sha256(np.load(tmp, mmap_mode="r"))}))
        os.replace(tmp, path)
        os.replace(f"{record}.{os.getpid()}.tmp", record)
    return records.Mapped(path)


class _Recent:
    """The last few values computed per record, shared by grain's reading threads (a lock; two
    threads may both compute one value, never mix two)."""

    def __init__(self, size: int):
        self.size, self.lock, self.items = size, threading.Lock(), collections.OrderedDict()

    def get(self, i: int, make):
        with self.lock:
            if i in self.items:
                return self.items[i]
        value = make(i)
        with self.lock:
            self.items[i] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class RegionCrops:
    """The regions of `kind` of `source`'s records as a source of their own: region r is the
    crop of its box from its record's image (a few recent records' images and lines kept, so a
    record is decoded once for all its regions), keyed f"{record key}#{region id}". An unreadable
    image leaves its regions unreadable (named, skipped by the pipeline)."""

    def __init__(self, source, offsets_path: pathlib.Path, kind: str = "objects"):
        self.source, self.kind = source, kind
        self.offsets = region_offsets(source, pathlib.Path(offsets_path), kind)
        self._caches()

    def _caches(self):
        self._records, self._images = _Recent(64), _Recent(4)

    def __len__(self):
        return int(self.offsets[len(self.offsets) - 1])

    def _record(self, i: int) -> tuple[Regions, str | None]:
        regions = self.source.regions(i).of_kind(self.kind)
        return regions, self.source.key(i) if self.source.unkeyed is None else None

    def _decoded(self, i: int):
        try:
            return transforms.decode(self.source[i])
        except transforms.CorruptImage as e:
            return e

    def _locate(self, r: int) -> tuple[int, Regions, str | None, int]:
        i = int(np.searchsorted(self.offsets.array(), r, side="right")) - 1
        regions, key = self._records.get(i, self._record)
        return i, regions, key, int(r - self.offsets[i])

    def __getitem__(self, r):
        i, regions, _, j = self._locate(int(r))
        image = self._images.get(i, self._decoded)
        if isinstance(image, transforms.CorruptImage):
            return {"image_bytes": b"", "error": str(image), "path": self.name(r), "label": -1}
        x0, y0, x1, y1 = regions.boxes[j]
        box = (math.floor(x0), math.floor(y0), max(math.ceil(x1), math.floor(x0) + 1),
               max(math.ceil(y1), math.floor(y0) + 1))
        return {"image": np.asarray(image.crop(box)), "label": -1}

    def name(self, r):
        i, regions, _, j = self._locate(int(r))
        box = ", ".join(f"{v:g}" for v in regions.boxes[j])
        return f"{self.source.name(i)} region {int(regions.ids[j])} [{box}]"

    def key(self, r) -> str:
        _, regions, key, j = self._locate(int(r))
        if key is None:
            raise UserError(self.unkeyed)
        return region_key(key, int(regions.ids[j]))

    def key_hashes(self, indices) -> np.ndarray:
        return record_keys.hashes(self.key(int(r)) for r in indices)

    @property
    def unkeyed(self):
        return self.source.unkeyed

    def fingerprint(self):
        return records.digest("regions", self.kind, self.source.fingerprint(),
                              self.source.regions_fingerprint())

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_records", "_images")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._caches()
