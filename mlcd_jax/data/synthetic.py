"""A synthetic source whose labels depend on image content, so the loss can really fall.

Class k has a fixed random template image; an example of class k is its template plus Gaussian
noise, and its l labels are the l templates nearest (by cosine) to template k, itself first: the
multi-labels MLCD would get by clustering clean templates. Batch `step` is a pure function of
(seed, step), so the iterator state is just the step and a resumed run sees the same batches.
"""

from __future__ import annotations

import numpy as np

from mlcd_jax.runtime.errors import UserError

MAX_CLASSES = 50_000  # templates × templates similarities are computed densely


class SyntheticSource:
    def __init__(self, *, num_classes: int, num_labels: int, image_size: int, noise: float,
                 seed: int):
        if num_classes > MAX_CLASSES:
            raise UserError(f"config.head.num_classes: the synthetic source supports at most "
                            f"{MAX_CLASSES} classes, got {num_classes}; use a real data source")
        if num_labels > num_classes:
            raise UserError(f"config.data.num_labels {num_labels} exceeds num_classes "
                            f"{num_classes}")
        rng = np.random.default_rng(seed)
        self.templates = (rng.normal(size=(num_classes, image_size, image_size, 3))
                          .astype(np.float32))
        flat = self.templates.reshape(num_classes, -1)
        flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
        sims = flat @ flat.T
        np.fill_diagonal(sims, np.inf)  # itself first
        self.labels = np.argsort(-sims, axis=1, kind="stable")[:, :num_labels].astype(np.int32)
        self.noise, self.seed = noise, seed

    def batch(self, step: int, shape: tuple[int, ...], rows: slice = slice(None)):
        """(images, labels) of global batch `step`, shaped `shape` + (H, W, 3) and `shape` + (l,);
        `rows` selects this process's part of the last batch dimension."""
        rng = np.random.default_rng([self.seed, 1, step])
        classes = rng.integers(0, len(self.templates), size=shape)
        noise = rng.normal(size=shape + self.templates.shape[1:]).astype(np.float32)
        images = self.templates[classes] + self.noise * noise
        return images[..., rows, :, :, :], self.labels[classes][..., rows, :]

    def regions(self, step: int, shape: tuple[int, ...], rows: slice, slots: int,
                heads: dict[str, tuple[int, int]]):
        """Region slots of batch `step` (the region heads' synthetic data): (boxes `shape` +
        (slots, 4) in pixels, {name: labels `shape` + (slots, l)}) for `heads` {name: (K, l)}.
        A region's first label is a function of its image's class and its slot (so a head can
        learn it), the rest −1; a quarter of the slots are padding (box 0, labels −1)."""
        size = self.templates.shape[1]
        rng = np.random.default_rng([self.seed, 2, step])
        classes = np.random.default_rng([self.seed, 1, step]).integers(
            0, len(self.templates), size=shape)
        corners = np.sort(rng.uniform(0, size, size=shape + (slots, 2, 2)), axis=-2)  # (x, y)
        boxes = corners.reshape(shape + (slots, 4))  # [x0, y0, x1, y1]
        real = rng.random(shape + (slots,)) >= 0.25
        boxes = np.where(real[..., None], boxes, 0).astype(np.float32)
        labels = {}
        for name, (k, l) in heads.items():
            first = (classes[..., None] * 7 + np.arange(slots) * 3) % k
            out = np.full(shape + (slots, l), -1, np.int32)
            out[..., 0] = np.where(real, first, -1)
            labels[name] = out[..., rows, :, :]
        return boxes[..., rows, :, :], labels
