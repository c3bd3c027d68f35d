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
    if kind == "folder":
        return FolderSource(data.path)
    if kind == "arrayrecord":
        return ArrayRecordSource(data.path)
    if kind == "tfds":
        return TfdsSource(data.tfds_name, data.split, data.path or None)
    raise ValueError(f"config.data.source must be one of synthetic, digits, folder, arrayrecord, "
                     f"tfds; got {kind!r}")
