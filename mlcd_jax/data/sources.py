"""Random-access sources of examples: ``len(source)`` and ``source[i]`` → a dict with either
"image" (uint8 H × W × 3) or "image_bytes" (an encoded JPEG/PNG/...), plus "label" where known.

* `DigitsSource`: scikit-learn's bundled handwritten digits (1,797 real 8 × 8 images, no download).
* `FolderSource`: image files under a folder (sorted paths; class = first sub-folder, if any).
* `ArrayRecordSource`: ArrayRecord files whose records are encoded images (`mlcd_jax.data.convert`).
* `TfdsSource`: ``tfds.data_source`` (ArrayRecord-backed tfds datasets; no TensorFlow needed).
"""

from __future__ import annotations

import glob
import pathlib

import numpy as np
from PIL import Image

SOURCES = ("synthetic", "digits", "digits_canvas", "folder", "arrayrecord", "tfds")
LABELLED = tuple(s for s in SOURCES if s != "synthetic")  # real images with classes: evaluable
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DigitsSource:
    def __init__(self):
        from sklearn.datasets import load_digits
        digits = load_digits()
        gray = np.round(digits.images / 16.0 * 255).astype(np.uint8)  # values 0..16 → 0..255
        self.images = np.repeat(gray[..., None], 3, axis=-1)
        self.labels = digits.target.astype(np.int32)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


class DigitsCanvasSource:
    """The demo's task: each digit at a random scale and position on a larger blank canvas (fixed
    per example), so raw pixels are a weak representation while the digit is still plain to see.
    `clean` keeps the original 8 × 8 digits (the teacher's view). A seeded `split` of the 1,797."""

    def __init__(self, split: str = "train", canvas: int = 32, test_fraction: float = 0.3,
                 seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"config.data.split for digits_canvas must be train or test, got {split!r}")
        digits = DigitsSource()
        order = np.random.default_rng(seed).permutation(len(digits))
        n_test = round(len(digits) * test_fraction)
        self.indices = np.sort(order[n_test:] if split == "train" else order[:n_test])
        self.clean = digits.images[self.indices, :, :, 0]  # uint8 8 × 8
        self.labels = digits.labels[self.indices]
        rng = np.random.default_rng([seed, 1])
        self.images = np.zeros((len(self.indices), canvas, canvas, 3), np.uint8)
        for i, digit in enumerate(self.clean):
            size = int(rng.integers(canvas // 4, canvas * 5 // 8 + 1))
            x, y = rng.integers(0, canvas - size + 1, size=2)
            glyph = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR))
            self.images[i, y:y + size, x:x + size] = glyph[..., None]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


class FolderSource:
    def __init__(self, root):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"config.data.path: {self.root} is not a folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise FileNotFoundError(f"config.data.path: no images ({', '.join(IMAGE_SUFFIXES)}) "
                                    f"under {self.root}")
        classes = sorted({p.relative_to(self.root).parts[0] for p in self.paths
                          if len(p.relative_to(self.root).parts) > 1})
        self.class_index = {c: i for i, c in enumerate(classes)}

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        parts = path.relative_to(self.root).parts
        return {"image_bytes": path.read_bytes(), "path": str(path),
                "label": self.class_index[parts[0]] if len(parts) > 1 else -1}


class ArrayRecordSource:
    def __init__(self, pattern):
        import grain
        self.files = sorted(glob.glob(str(pattern)))
        if not self.files:
            raise FileNotFoundError(f"config.data.path: no ArrayRecord files match {pattern} "
                                    "(make them with `python -m mlcd_jax.data.convert`)")
        self.source = grain.sources.ArrayRecordDataSource(self.files)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {"image_bytes": self.source[i], "label": -1}

    def __getstate__(self):  # reopened in grain worker processes
        return {"files": self.files}

    def __setstate__(self, state):
        import grain
        self.files = state["files"]
        self.source = grain.sources.ArrayRecordDataSource(self.files)


class TfdsSource:
    def __init__(self, name, split, data_dir=None):
        import tensorflow_datasets as tfds
        self.args = (name, split, data_dir)
        self.source = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        example = self.source[i]
        return {"image": np.asarray(example["image"]), "label": int(example.get("label", -1))}


def make_source(data) -> object:
    """The source a config's `data` section names."""
    kind = data.source
    if kind == "digits":
        return DigitsSource()
    if kind == "digits_canvas":
        return DigitsCanvasSource(data.split)
    if kind == "folder":
        return FolderSource(data.path)
    if kind == "arrayrecord":
        return ArrayRecordSource(data.path)
    if kind == "tfds":
        return TfdsSource(data.tfds_name, data.split, data.path or None)
    raise ValueError(f"config.data.source must be one of {SOURCES}; got {kind!r}")
