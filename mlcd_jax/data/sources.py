"""Random-access sources of examples: ``len(source)`` and ``source[i]`` → a dict with either
"image" (uint8 H × W × 3) or "image_bytes" (an encoded JPEG/PNG/...), plus "label" where known.
Each also has ``name(i)`` (what a person calls record i: its file, or its place in a shard),
``key(i)`` (what its labels are joined by: a folder file's relative path, img2dataset's sample key;
bundled data: its name) with ``key_hashes(indices)`` (`mlcd_jax/data/record_keys.py`; `unkeyed`
says why a
source has no keys, None when it has) and ``fingerprint()`` (changes when the records change), so
later stages can name a bad record, join it with its labels and tell stale results from current
ones. Sources whose images come with text have ``captions(i)``
(the image's own captions, a list; LiT and retrieval read them). Sources whose images come with
boxes (`data/regions.py`: ArrayRecord converted with --regions, a folder given `regions=`) have
``regions(i)`` (a `regions.Regions`: boxes (n, 4) float32, texts, ids), ``region_counts(indices)``
((n, 2): all regions, those with a text), ``regions_fingerprint()`` and ``no_regions`` (why a
source has none; None when it has them).

* `DigitsSource`: scikit-learn's bundled handwritten digits (1,797 real 8 × 8 images, no download).
* `DigitsCanvasSource`, `DigitsRegionsSource`: the demo's canvases of them (one digit; several
  digits as object regions and a line of digits as a text region); `DigitsStripsSource`: strips
  of 1–6 digits, wide or tall (native resolution's demo).
* `FolderSource`: image files under a folder (sorted paths; class = first sub-folder, if any;
  caption = the text file beside an image, as img2dataset's "files" output writes it).
* `ArrayRecordSource`: ArrayRecord files whose records are encoded images (`mlcd_jax.data.convert`;
  captions from convert's index).
* `TfdsSource`: ``tfds.data_source`` (ArrayRecord-backed tfds datasets; no TensorFlow needed;
  captions from a "caption" or "captions" feature).
"""

from __future__ import annotations

import glob
import hashlib
import json
import pathlib
import re

import numpy as np
from PIL import Image

from mlcd_jax.config.schema import LABELLED, SOURCES, WITH_SPLITS  # noqa: F401  (re-exported)
from mlcd_jax.data import index as index_lib, record_keys, regions as regions_lib
from mlcd_jax.runtime.errors import MissingFile, UserError
from mlcd_jax.runtime.files import digest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def caption_text(data: bytes) -> str:
    """A caption file's text (img2dataset's KEY.txt): UTF-8, a bad byte replaced, not fatal."""
    return data.decode("utf-8", errors="replace").strip()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class _Keyed:
    """Keys are names (bundled and tfds data: stable for the same dataset, split and seed)."""

    unkeyed = None

    def key(self, i) -> str:
        return self.name(i)

    def key_hashes(self, indices) -> np.ndarray:
        return record_keys.hashes(self.key(int(i)) for i in indices)


class Subset(_Keyed):
    """Records `indices` (a range or an array) of `source`, in that order."""

    def __init__(self, source, indices):
        self.source, self.indices = source, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]

    def name(self, i):
        return self.source.name(int(self.indices[i]))

    def key(self, i):
        return self.source.key(int(self.indices[i]))

    def _picked(self, indices) -> np.ndarray:
        """The source's indices of records `indices` (a range is indexed without listing it)."""
        indices = np.asarray(indices, np.int64)
        r = self.indices
        if isinstance(r, range):
            return r.start + r.step * indices
        return np.asarray(r[indices])

    def key_hashes(self, indices):
        return self.source.key_hashes(self._picked(indices))

    @property
    def unkeyed(self):
        return self.source.unkeyed

    def __getattr__(self, name):
        """What the source says of a record beside its image (`captions`, `caption_fields`,
        `regions`, `region_counts`, ...), where it says it."""
        source = self.__dict__.get("source")
        if name in ("captions", "caption_fields", "regions") and hasattr(source, name):
            return lambda i: getattr(source, name)(int(self.indices[i]))
        if name == "region_counts" and hasattr(source, name):
            return lambda indices: source.region_counts(self._picked(indices))
        if name in ("regions_fingerprint", "no_regions", "region_classes",
                    "class_index") and hasattr(source, name):
            return getattr(source, name)
        raise AttributeError(name)

    def fingerprint(self):
        indices = self.indices
        key = ([indices.start, indices.stop, indices.step] if isinstance(indices, range)
               else getattr(indices, "fingerprint", lambda: None)()
               or hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest())
        return digest(self.source.fingerprint(), key)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) of values 0..16 and their classes, read from
    the file scikit-learn bundles without importing scikit-learn (~1 CPU-s in every command that
    reads them: each of the demo's); its own `load_digits` where that file has moved."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(root, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")  # 64 pixel columns, then the class
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as load
    digits = load()
    return digits.images, digits.target


class DigitsSource(_Keyed):
    def __init__(self):
        images, classes = load_digits()
        gray = np.round(images / 16.0 * 255).astype(np.uint8)  # values 0..16 → 0..255
        self.images = np.repeat(gray[..., None], 3, axis=-1)
        self.labels = classes.astype(np.int32)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}

    def name(self, i):
        return f"digits[{i}]"

    def fingerprint(self):
        return digest("digits", len(self))


class DigitsCanvasSource(_Keyed):
    """The demo's task: each digit at a random scale and position on a larger blank canvas (fixed
    per example), so raw pixels are a weak representation while the digit is still plain to see.
    `clean` keeps the original 8 × 8 digits (the teacher's view). A seeded `split` of the 1,797."""

    def __init__(self, split: str = "train", canvas: int = 32, test_fraction: float = 0.3,
                 seed: int = 0):
        if split not in ("train", "test"):
            raise UserError("config.data.split for digits_canvas must be train or test, "
                            f"got {split!r}")
        digits = DigitsSource()
        order = np.random.default_rng(seed).permutation(len(digits))
        n_test = round(len(digits) * test_fraction)
        self.indices = np.sort(order[n_test:] if split == "train" else order[:n_test])
        self.clean = digits.images[self.indices, :, :, 0]  # uint8 8 × 8
        self.labels = digits.labels[self.indices]
        self.split, self.seed = split, seed
        rng = np.random.default_rng([seed, 1])
        self.images = np.zeros((len(self.indices), canvas, canvas, 3), np.uint8)
        self.boxes = np.zeros((len(self.indices), 3), np.int64)  # x, y, size of each glyph
        for i, digit in enumerate(self.clean):
            size = int(rng.integers(canvas // 4, canvas * 5 // 8 + 1))
            x, y = rng.integers(0, canvas - size + 1, size=2)
            glyph = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR))
            self.images[i, y:y + size, x:x + size] = glyph[..., None]
            self.boxes[i] = x, y, size
        self.canvas = canvas

    def caption_fields(self, i) -> dict[str, str]:
        """What a caption can say of image i beside its digit: the glyph's size (small, medium,
        large: thirds of the range of sizes) and the third of the canvas its centre is in."""
        x, y, size = (int(v) for v in self.boxes[i])
        smallest, largest = self.canvas // 4, self.canvas * 5 // 8
        third = lambda v: min(2, 3 * v // self.canvas)
        row = ("top", "middle", "bottom")[third(y + size // 2)]
        col = ("left", "centre", "right")[third(x + size // 2)]
        return {"size": ("small", "medium", "large")[min(2, 3 * (size - smallest)
                                                         // (largest - smallest + 1))],
                "place": "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}

    def name(self, i):
        return f"digits_canvas/{self.split}[{i}]"

    def fingerprint(self):
        return digest("digits_canvas", self.split, self.seed, len(self))


class DigitsRegionsSource(_Keyed):
    """Regions on bundled data (RICE's demo and tests; no download): each image a `canvas`²
    canvas with several of scikit-learn's 8 × 8 digits at random sizes and places, each an
    OBJECT region (its box, its class: the digit), and a TEXT region: a line of 2–4 smaller
    digits side by side whose text is the digits it holds (e.g. "371"; no class).

    Image i is built around digit i of a seeded split of the 1,797 (digits_canvas's split): that
    digit is the largest glyph (sizes 5/16–7/16 of the canvas; the other objects 1/5–1/4, the
    text's digits 1/6–1/5), so the image's class, `labels[i]`, is the digit of its largest glyph.
    The other glyphs are drawn from the same split, so no test image holds a train digit. Every
    image's layout is seeded by (seed, its digit), placed without overlap (1 px apart): its boxes
    are exact (the glyph's square, in pixels of the canvas), its key its name. Regions are listed
    objects first (the largest first), the text last."""

    CLASSES = tuple(str(d) for d in range(10))
    TRIES = 100  # places drawn for a glyph (or a line) before it is left out

    def __init__(self, split: str = "train", canvas: int = 48, test_fraction: float = 0.3,
                 seed: int = 0):
        if split not in ("train", "test"):
            raise UserError("config.data.split for digits_regions must be train or test, "
                            f"got {split!r}")
        if canvas < 32:
            raise UserError(f"digits_regions: canvas must be ≥ 32 px (text digits of ≥ 6 px), "
                            f"got {canvas}")
        digits = DigitsSource()
        order = np.random.default_rng(seed).permutation(len(digits))
        n_test = round(len(digits) * test_fraction)
        self.indices = np.sort(order[n_test:] if split == "train" else order[:n_test])
        self.pool = digits.images[self.indices, :, :, 0]  # uint8 8 × 8, this split's digits
        self.clean, self.labels = self.pool, digits.labels[self.indices]
        self.split, self.seed, self.canvas = split, seed, canvas
        self.images = np.zeros((len(self.indices), canvas, canvas, 3), np.uint8)
        self._regions, self._glyphs = [], []
        for i in range(len(self.indices)):
            regions, glyphs = self._layout(i, digits.labels[self.indices])
            self._regions.append(regions)
            self._glyphs.append(glyphs)
        self._counts = np.array([(len(r), int(r.texted.sum())) for r in self._regions], np.int64)

    def _layout(self, i: int, labels: np.ndarray):
        """Image i drawn into self.images: its Regions and each region's pool digits."""
        c = self.canvas
        rng = np.random.default_rng([self.seed, 2, int(self.indices[i])])
        taken: list[tuple[int, int, int, int]] = []

        def place(w: int, h: int):
            for _ in range(self.TRIES):
                x, y = (int(v) for v in rng.integers(0, [c - w + 1, c - h + 1]))
                if all(x + w < a or c_ < x or y + h < b or d < y for a, b, c_, d in taken):
                    taken.append((x, y, x + w, y + h))
                    return x, y
            return None

        def draw(digit: int, x: int, y: int, size: int):
            glyph = Image.fromarray(self.pool[digit]).resize((size, size), Image.BILINEAR)
            self.images[i, y:y + size, x:x + size] = np.asarray(glyph)[..., None]

        objects = [(i, int(rng.integers(c * 5 // 16, c * 7 // 16 + 1)))]  # (digit, size)
        for _ in range(int(rng.integers(1, 3))):
            objects.append((int(rng.integers(len(self.pool))),
                            int(rng.integers(c // 5 + 1, c // 4 + 1))))
        line = [int(d) for d in rng.integers(len(self.pool), size=int(rng.integers(2, 5)))]
        glyph, gap = int(rng.integers(c // 6, c // 5 + 1)), int(rng.integers(0, 2))
        boxes, texts, classes, glyphs = [], [], [], []
        text = None
        for k, (digit, size) in enumerate(objects):
            at = place(size, size)  # the largest glyph goes first, on an empty canvas: placed
            if at is not None:
                draw(digit, *at, size)
                boxes.append((*at, at[0] + size, at[1] + size))
                texts.append(None)
                classes.append(int(labels[digit]))
                glyphs.append((digit,))
            while k == 0 and len(line) >= 2 and text is None:  # the line next: it needs room
                width = len(line) * (glyph + gap) - gap
                at = place(width, glyph)
                if at is None:
                    line = line[:-1]  # a shorter line where a long one does not fit
                    continue
                for j, d in enumerate(line):
                    draw(d, at[0] + j * (glyph + gap), at[1], glyph)
                text = ((*at, at[0] + width, at[1] + glyph),
                        "".join(str(int(labels[d])) for d in line), tuple(line))
        if text is not None:
            boxes.append(text[0])
            texts.append(text[1])
            classes.append(-1)
            glyphs.append(text[2])
        regions = regions_lib.Regions(np.asarray(boxes, np.float32).reshape(-1, 4), tuple(texts),
                                      np.arange(len(boxes), dtype=np.int32),
                                      np.asarray(classes, np.int32))
        return regions, glyphs

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}

    def name(self, i):
        return f"digits_regions/{self.split}[{i}]"

    def fingerprint(self):
        return digest("digits_regions", self.split, self.seed, self.canvas, len(self))

    no_regions = None

    def regions(self, i) -> regions_lib.Regions:
        return self._regions[int(i)]

    def region_counts(self, indices) -> np.ndarray:
        return self._counts[np.asarray(indices, np.int64)]

    def regions_fingerprint(self) -> str:
        return digest("digits_regions regions", self.split, self.seed, self.canvas, len(self))

    def region_classes(self) -> list[str]:
        return list(self.CLASSES)

    def region_glyphs(self, i) -> list[np.ndarray]:
        """Each region's clean 8 × 8 digits side by side (uint8 8 × 8k): the teacher's view."""
        return [np.concatenate([self.pool[d] for d in ds], axis=1) for ds in self._glyphs[int(i)]]


class DigitsStripsSource(_Keyed):
    """Native resolution's demo task (no download): each image a strip of 1–6 of
    scikit-learn's 8 × 8 digits side by side, wide (a row) or tall (a column), so the images range
    from square to 1:6 and 6:1 and a task about the whole strip needs all of it: how many digits
    (the class: `labels[i]` = count − 1) and which (`digits[i]`, in reading order).

    Strip i is built around digit i of a seeded split of the 1,797 (digits_canvas's split): its
    count, orientation, glyph size (8–11 px), gap (0–2 px) and margin (1–3 px) are drawn from
    (seed, its digit), the other digits from the same split, so no test strip holds a train
    digit. `clean` is the teacher's view: the strip's clean 8 × 8 digits in order, zero slots
    after them (count 6 × 64 pixels)."""

    MAX_DIGITS = 6

    def __init__(self, split: str = "train", test_fraction: float = 0.3, seed: int = 0):
        if split not in ("train", "test"):
            raise UserError("config.data.split for digits_strips must be train or test, "
                            f"got {split!r}")
        digits = DigitsSource()
        order = np.random.default_rng(seed).permutation(len(digits))
        n_test = round(len(digits) * test_fraction)
        self.indices = np.sort(order[n_test:] if split == "train" else order[:n_test])
        pool = digits.images[self.indices, :, :, 0]  # uint8 8 × 8, this split's digits
        pool_labels = digits.labels[self.indices]
        self.split, self.seed = split, seed
        self.images, self.digits = [], []
        self.clean = np.zeros((len(self.indices), self.MAX_DIGITS * 64), np.uint8)
        for i, index in enumerate(self.indices):
            rng = np.random.default_rng([seed, 3, int(index)])
            n = int(rng.integers(1, self.MAX_DIGITS + 1))
            members = [i, *(int(j) for j in rng.integers(len(pool), size=n - 1))]
            rng.shuffle(members)
            wide = bool(rng.integers(2))
            glyph, gap, margin = (int(rng.integers(a, b + 1)) for a, b in ((8, 11), (0, 2),
                                                                             (1, 3)))
            long_side = n * glyph + (n - 1) * gap + 2 * margin
            h, w = (glyph + 2 * margin, long_side) if wide else (long_side, glyph + 2 * margin)
            image = np.zeros((h, w, 3), np.uint8)
            for k, j in enumerate(members):
                at = margin + k * (glyph + gap)
                y, x = (margin, at) if wide else (at, margin)
                image[y:y + glyph, x:x + glyph] = np.asarray(
                    Image.fromarray(pool[j]).resize((glyph, glyph), Image.BILINEAR))[..., None]
                self.clean[i, 64 * k:64 * (k + 1)] = pool[j].reshape(-1)
            self.images.append(image)
            self.digits.append(tuple(int(pool_labels[j]) for j in members))
        self.labels = np.array([len(d) - 1 for d in self.digits], np.int32)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}

    def name(self, i):
        return f"digits_strips/{self.split}[{i}]"

    def fingerprint(self):
        return digest("digits_strips", self.split, self.seed, len(self))


class FolderSource:
    """Image files under `root` in sorted order; the class is the first sub-folder; the key is
    the relative path (as convert keys a folder). `classes` (another folder's `class_index`) makes
    a test folder use the train folder's class ids. `regions` (what convert's --regions takes)
    gives each image its boxes: matched and checked once, as convert does, into an index of this
    folder's records in a temporary directory."""

    unkeyed = None

    def __init__(self, root, *, classes: dict[str, int] | None = None, field="config.data.path",
                 regions: str | None = None, region_rules: regions_lib.Rules | None = None):
        if not str(root):
            raise MissingFile(f"{field} is empty: set it to the folder of images")
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise MissingFile(f"{field}: {self.root} is not a folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise MissingFile(f"{field}: no images ({', '.join(IMAGE_SUFFIXES)}) "
                              f"under {self.root}")
        found = sorted({p.relative_to(self.root).parts[0] for p in self.paths
                        if len(p.relative_to(self.root).parts) > 1})
        if classes is not None:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise UserError(f"{field}: {self.root} has classes {unknown[:5]} that the train "
                                "folder does not; a test folder needs the train folder's classes")
            self.class_index = dict(classes)
        else:
            self.class_index = {c: i for i, c in enumerate(found)}
        self._regions = _folder_regions(self, regions, region_rules) if regions else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        parts = path.relative_to(self.root).parts
        return {"image_bytes": path.read_bytes(), "path": str(path),
                "label": self.class_index[parts[0]] if len(parts) > 1 else -1}

    def name(self, i):
        return str(self.paths[i])

    def key(self, i) -> str:
        return self.paths[i].relative_to(self.root).as_posix()

    def key_hashes(self, indices) -> np.ndarray:
        return record_keys.hashes(self.key(int(i)) for i in indices)

    def captions(self, i) -> list[str]:
        text = self.paths[i].with_suffix(".txt")
        return [caption_text(text.read_bytes())] if text.is_file() else []

    @property
    def no_regions(self) -> str | None:
        return (None if self._regions is not None else
                f"{self.root} was opened without regions (FolderSource(..., regions=...): a "
                "COCO-style .json, a .jsonl keyed by record key, a folder of SA-1B per-image "
                "JSON, or 'beside')")

    def regions(self, i) -> regions_lib.Regions:
        if self._regions is None:
            raise UserError(self.no_regions)
        return regions_lib.Regions.of_line(self._regions.line(i))

    def region_counts(self, indices) -> np.ndarray:
        if self._regions is None:
            raise UserError(self.no_regions)
        return self._regions.region_counts(indices)

    def regions_fingerprint(self) -> str | None:
        return None if self._regions is None else self._regions.regions["sha256"]

    def region_classes(self) -> list[str] | None:
        """The names of the regions' classes (`Regions.classes` indexes them; None: none)."""
        if self._regions is None:
            raise UserError(self.no_regions)
        return self._regions.regions.get("classes")

    def fingerprint(self):
        return digest("folder", [str(p.relative_to(self.root)) for p in self.paths])


def _folder_regions(folder: FolderSource, spec: str, rules) -> index_lib.Index:
    """Each image's regions matched and checked as convert does (sizes from the headers), into
    an index of the folder's records in a temporary directory (removed with the source; grain's
    worker processes read the same files)."""
    import shutil
    import tempfile
    import weakref
    work = pathlib.Path(tempfile.mkdtemp(prefix="mlcd_jax_regions_"))
    weakref.finalize(folder, shutil.rmtree, work, ignore_errors=True)
    annotations = regions_lib.Annotations(spec, work / "annotations", rules)
    writer = index_lib.Writer(work / "folder", regions={})
    writer.new_shard()
    try:
        for i, path in enumerate(folder.paths):
            key = folder.key(i)
            meta = path.with_suffix(".json")
            sidecar = None
            if spec == regions_lib.BESIDE and meta.is_file():
                try:
                    sidecar = json.loads(meta.read_bytes())
                except ValueError as e:
                    raise UserError(f"{meta}: not JSON ({e}); fix or remove it") from None
            writer.add(key, key, None, annotations.of(key, key, regions_lib.image_size(path),
                                                      sidecar))
    except BaseException:
        writer.abandon()
        annotations.close()
        raise
    annotations.report(what=f"regions of {folder.root}")
    writer.regions = annotations.summary()
    annotations.close()
    writer.finish([])
    return index_lib.Index(work / "folder")


SHARD_NAME = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.array_record$")  # prefix, shard k, of N


class ArrayRecordSource:
    """ArrayRecord files matching `pattern` (only `*.array_record`: a glob such as 'data/train*'
    also matches convert's index). A file that convert's index (`data/index.py`) lists with its
    size is counted from the index; any other is opened once up front, so a damaged or foreign
    file is named before training. The index names records and gives their captions, by record,
    in O(1): start-up and memory do not grow with the data. Records converted from a folder's
    class sub-folders have their class (`class_index`: name → id, sorted by name as a
    `FolderSource`'s; `classes`: another source's, so test files use the train files' ids)."""

    def __init__(self, pattern, *, field="config.data.path", classes: dict[str, int] | None = None):
        from array_record.python.array_record_module import ArrayRecordReader
        if not str(pattern):
            raise MissingFile(f"{field} is empty: set it to the ArrayRecord files, e.g. "
                              "'data/train-*.array_record'")
        matched = sorted(glob.glob(str(pattern)))
        self.files = [f for f in matched if f.endswith(".array_record")]
        if not self.files:
            extra = (f" (it matches {len(matched)} other files, e.g. {matched[0]})" if matched
                     else "")
            raise MissingFile(f"{field}: no *.array_record files match {pattern}{extra}; "
                              "make them with `python -m mlcd_jax.data.convert`")
        self._indexes: dict[str, index_lib.Index | index_lib.StaleIndex | None] = {}
        self.counts, self.first = [], []  # per file: records, and its first record in its index
        for f in self.files:
            listed = self._listed(f)
            if listed is not None:
                self.first.append(listed[0])
                self.counts.append(listed[1])
                continue
            self.first.append(None)
            try:
                reader = ArrayRecordReader(f)
                self.counts.append(reader.num_records())
                reader.close()
            except Exception as e:  # riegeli raises plain RuntimeErrors without the file name
                raise UserError(f"{field}: {f} is not a readable ArrayRecord file "
                                f"({_first_line(e)}); "
                                "remake it with `python -m mlcd_jax.data.convert`") from None
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.class_index = self._classes(classes, field)
        self._labels: dict[str, tuple] = {}  # per index: (its ids here, its records' table)
        self._open()

    def _classes(self, classes: dict[str, int] | None, field: str) -> dict[str, int]:
        """The class sub-folders' names of the files' indexes, as ids ({}: no classes)."""
        found = sorted({name for f in self.files if isinstance(index := self._index(f),
                                                                index_lib.Index)
                        for name in index.classes or ()})
        if classes is None:
            return {name: i for i, name in enumerate(found)}
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"{field}: its records have classes {unknown[:5]} that the train "
                            "images do not; test images need the train images' classes")
        return dict(classes)

    def label(self, i) -> int:
        """Record i's class id in `class_index` (-1: none)."""
        f, local = self._locate(i)
        if not self.class_index or self.first[f] is None:
            return -1
        index = self._index(self.files[f])
        if not index.classes:
            return -1
        if index.prefix not in self._labels:  # its ids in this numbering; its table, mapped
            ids = np.array([self.class_index[name] for name in index.classes] + [-1], np.int32)
            self._labels[index.prefix] = ids, index.labels()
        ids, table = self._labels[index.prefix]
        return int(ids[table[self.first[f] + local]])  # -1 (no class) picks the appended -1

    def _index(self, shard: str):
        """Convert's index of `shard`'s output (None: not convert's name, or no index; a
        StaleIndex: one that cannot be used, kept to say why)."""
        match = SHARD_NAME.match(shard)
        if match is None:
            return None
        prefix = match.group(1)
        if prefix not in self._indexes:
            if not index_lib.paths(prefix)[0].is_file():
                self._indexes[prefix] = None
            else:
                try:
                    self._indexes[prefix] = index_lib.Index(prefix)
                except index_lib.StaleIndex as e:
                    self._indexes[prefix] = e
        return self._indexes[prefix]

    def _listed(self, shard: str) -> tuple[int, int] | None:
        """(first record, records) of `shard` in its index, if the index lists it at its size."""
        index = self._index(shard)
        if not isinstance(index, index_lib.Index):
            return None
        entry = index.shards.get(pathlib.Path(shard).name)
        if entry is None or entry[2] != pathlib.Path(shard).stat().st_size:
            return None
        return entry[0], entry[1]

    def _open(self):
        import grain
        # "file[0:n]" tells grain the record count, so it does not reopen every file.
        self.source = grain.sources.ArrayRecordDataSource(
            [f"{f}[0:{n}]" for f, n in zip(self.files, self.counts)])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        try:
            return {"image_bytes": self.source[i], "label": self.label(i), "path": self.name(i)}
        except Exception as e:  # a damaged region of a file: the record is skipped, and named
            return {"image_bytes": b"", "label": -1, "path": self.name(i),
                    "error": _first_line(e)}

    def _locate(self, i) -> tuple[int, int]:
        f = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return f, int(i - self.offsets[f])

    def name(self, i):
        """Record i's original name from convert's index (when it lists the file) and its place
        in its file."""
        f, local = self._locate(i)
        place = f"{self.files[f]}[{local}]"
        if self.first[f] is None:
            return place
        try:
            return f"{self._index(self.files[f]).line(self.first[f] + local)['name']} ({place})"
        except (OSError, ValueError, KeyError):
            return place

    def _unindexed(self, f: int, what: str) -> UserError:
        """Why file f's records have no `what` (its index is missing, stale or older)."""
        index = self._index(self.files[f])
        if isinstance(index, index_lib.StaleIndex):
            return index
        if index is None:
            return UserError(f"{self.files[f]}: no convert index beside it "
                             f"({_index_of(self.files[f]) or 'PREFIX.index.jsonl'}), so its "
                             f"records have no {what}; make the files with "
                             "`python -m mlcd_jax.data.convert`")
        return UserError(f"{index.lines_path} lists {index.records:,} records but not "
                         f"{self.files[f]} as it is now; it is stale: convert again with "
                         "--overwrite")

    def _line(self, i, what: str) -> dict:
        f, local = self._locate(i)
        if self.first[f] is None:
            raise self._unindexed(f, what)
        return self._index(self.files[f]).line(self.first[f] + local)

    def captions(self, i) -> list[str]:
        """Record i's caption, from convert's index (convert keeps the text beside each image)."""
        caption = self._line(i, "captions").get("caption")
        return [caption] if caption is not None else []

    @property
    def no_regions(self) -> str | None:
        """Why the records have no regions (None: every file's index has them)."""
        for f, shard in enumerate(self.files):
            if self.first[f] is None:
                return str(self._unindexed(f, "regions"))
            index = self._index(shard)
            if index.regions is None:
                return (f"{index.lines_path} has no regions: convert with --regions (a "
                        "COCO-style .json, a .jsonl keyed by record key, a folder of SA-1B "
                        "per-image JSON, or 'beside')")
        return None

    def regions(self, i) -> regions_lib.Regions:
        """Record i's regions, from its line of convert's index."""
        f, _ = self._locate(i)
        if self.first[f] is not None and self._index(self.files[f]).regions is None:
            raise UserError(self.no_regions)
        return regions_lib.Regions.of_line(self._line(i, "regions"))

    def region_counts(self, indices) -> np.ndarray:
        """(n, 2) int64: the regions of records `indices`, all and those with a text, from each
        file's index table (no line parsed)."""
        indices = np.asarray(indices, np.int64)
        out = np.empty((len(indices), 2), np.int64)
        files = np.searchsorted(self.offsets, indices, side="right") - 1
        for f in np.unique(files):
            if self.first[f] is None:
                raise self._unindexed(int(f), "regions")
            mine = files == f
            out[mine] = self._index(self.files[f]).region_counts(
                self.first[f] + indices[mine] - self.offsets[f])
        return out

    def regions_fingerprint(self) -> str:
        """Changes when any record's regions change (each index's digest of them)."""
        if self.no_regions is not None:
            raise UserError(self.no_regions)
        return digest([self._index(f).regions.get("sha256") for f in self.files])

    def region_classes(self) -> list[str] | None:
        """The names of the regions' classes (`Regions.classes` indexes them; None: none), one
        list for every file: files whose indexes name them differently are refused (classes only
        numbered, as JSON lines give them, agree up to the largest)."""
        if self.no_regions is not None:
            raise UserError(self.no_regions)
        found = {}  # names → the first index that has them
        for f in self.files:
            index = self._index(f)
            names = index.regions.get("classes")
            if names:
                found.setdefault(tuple(names), index.lines_path)
        if not found:
            return None
        longest = max(found, key=len)
        if all(n == tuple(map(str, range(len(n)))) for n in found):
            return list(longest)
        if len(found) > 1:
            (a, first), (b, second) = list(found.items())[:2]
            raise UserError(f"{first} and {second} name their regions' classes differently "
                            f"({', '.join(a)[:60]} vs {', '.join(b)[:60]}); convert them "
                            "with one annotation file's categories")
        return list(longest)

    @property
    def unkeyed(self) -> str | None:
        """Why the records have no keys (None: every file's index has them)."""
        for f, shard in enumerate(self.files):
            if self.first[f] is None:
                return str(self._unindexed(f, "keys"))
            index = self._index(shard)
            if not index.keyed:
                return (f"{index.lines_path} has no record keys (an older convert wrote it); "
                        f"add them with `python -m mlcd_jax.data.convert --reindex "
                        f"{index.prefix}` (one pass, nothing re-encoded)")
        return None

    def key(self, i) -> str:
        """Record i's key, from convert's index."""
        line = self._line(i, "keys")
        if "key" not in line:
            raise UserError(self.unkeyed)
        return line["key"]

    def key_hashes(self, indices) -> np.ndarray:
        """The key hashes of records `indices`, read from each file's index table (no line
        parsed)."""
        indices = np.asarray(indices, np.int64)
        out = np.empty(len(indices), record_keys.HASH)
        files = np.searchsorted(self.offsets, indices, side="right") - 1
        for f in np.unique(files):
            if self.first[f] is None:
                raise self._unindexed(int(f), "keys")
            mine = files == f
            table = self._index(self.files[f]).hashes()
            out[mine] = table[self.first[f] + indices[mine] - self.offsets[f]]
        return out

    def fingerprint(self):
        return digest("arrayrecord", [[pathlib.Path(f).name, n, pathlib.Path(f).stat().st_size]
                                       for f, n in zip(self.files, self.counts)])

    def __getstate__(self):  # reopened in grain worker processes (the class ids made again)
        return {k: v for k, v in self.__dict__.items() if k != "source"} | {"_labels": {}}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()


def _index_of(shard: str) -> pathlib.Path | None:
    """Convert's PREFIX.index.jsonl for a shard PREFIX-0000k-of-N (None: not convert's name)."""
    match = SHARD_NAME.match(shard)
    return index_lib.paths(match.group(1))[0] if match else None


class TfdsSource(_Keyed):
    def __init__(self, name, split, data_dir=None):
        import tensorflow_datasets as tfds
        self.args = (name, split, data_dir)
        self.source = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        example = self.source[i]
        return {"image": np.asarray(example["image"]), "label": int(example.get("label", -1))}

    def name(self, i):
        return f"{self.args[0]}/{self.args[1]}[{i}]"

    def captions(self, i) -> list[str]:
        """The "caption" (one text) or "captions" (a sequence of texts, or of {"text": ...} as
        coco_captions has them) feature of example i."""
        example = self.source[i]
        found = example.get("caption", example.get("captions"))
        if isinstance(found, dict):
            found = found.get("text")
        if found is None:
            return []
        texts = [found] if isinstance(found, (str, bytes)) else list(np.asarray(found).ravel())
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]

    def fingerprint(self):
        return digest("tfds", self.args, len(self))


def make_source(data, *, field: str = "config.data.") -> object:
    """The source a config's `data` section names (`field` + "path" etc. name it in errors:
    "config.data." for a config section, "--" for command-line flags)."""
    kind = data.source
    if kind == "digits":
        return DigitsSource()
    if kind == "digits_canvas":
        return DigitsCanvasSource(data.split)
    if kind == "digits_regions":
        return DigitsRegionsSource(data.split)
    if kind == "digits_strips":
        return DigitsStripsSource(data.split)
    if kind == "folder":
        regions = getattr(data, "regions", None)
        rules = regions_lib.Rules(*(getattr(data, f, d) for f, d in (
            ("min_region_side", regions_lib.Rules.min_side),
            ("min_region_fraction", regions_lib.Rules.min_fraction))))
        return FolderSource(data.path, field=f"{field}path", regions=regions or None,
                            region_rules=rules)
    if kind == "arrayrecord":
        return ArrayRecordSource(data.path, field=f"{field}path")
    if kind == "tfds":
        return TfdsSource(data.tfds_name, data.split, data.path or None)
    raise UserError(f"{field}source must be one of {SOURCES}; got {kind!r}")
