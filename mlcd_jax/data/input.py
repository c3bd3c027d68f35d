"""The trainer's input: global (images, labels) arrays of each step, and a checkpointable state.

Batches are laid out (grad_accum, micro, ...) with `micro` split over the mesh's batch axes; each
process supplies its own rows (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from mlcd_jax.data import pipeline, sources, synthetic
from mlcd_jax.labels import store


def open_source(c):
    """The config's real data source (None for synthetic data): opened, and so checked, first."""
    return None if c.data.source == "synthetic" else sources.make_source(c.data)


class _Input:
    def __init__(self, c, sharding, source=None):
        self.c, self.sharding = c, sharding
        self.shape = (c.grad_accum, c.batch_size // c.grad_accum)
        self.skipped = pipeline.Skipped(source, keep=100)  # unreadable images skipped so far
        self._unsaid: list[str] = []

    def new_skips(self) -> list[str]:
        """Names of skipped images not yet returned by an earlier call."""
        new, self._unsaid = self._unsaid, []
        return new

    def _global(self, images, labels):
        local = self.shape[0], self.shape[1] // jax.process_count()
        return tuple(jax.make_array_from_process_local_data(self.sharding,
                                                            x.reshape(local + x.shape[1:]))
                     for x in (images, labels))


class SyntheticInput(_Input):
    """Batch `step` is a pure function of (seed, step): the state is the step."""

    def __init__(self, c, sharding, source=None):
        super().__init__(c, sharding)
        self.source = synthetic.SyntheticSource(
            num_classes=c.head.num_classes, num_labels=c.data.num_labels,
            image_size=c.data.image_size, noise=c.data.noise, seed=c.seed)
        self.step = 0

    def next(self):
        per = self.shape[1] // jax.process_count()
        rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
        images, labels = self.source.batch(self.step, self.shape, rows)
        self.step += 1
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        return self._global(flat(images), flat(labels))

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


class GrainInput(_Input):
    """A real source through the grain pipeline, joined with a label store by record index."""

    def __init__(self, c, sharding, source):
        super().__init__(c, sharding, source)
        labels_path = None
        if c.data.labels:
            labels = store.open_label_store(c.data.labels, num_examples=len(source),
                                            num_classes=c.head.num_classes)
            if labels.labels.shape[1] < c.data.num_labels:
                raise ValueError(f"{c.data.labels}/labels.npy has {labels.labels.shape[1]} labels "
                                 f"per example but config.data.num_labels = {c.data.num_labels}")
            store.check_label_range(labels)
            labels_path = str(pathlib.Path(c.data.labels) / "labels.npy")
        self.dataset = pipeline.dataset(
            source, batch_size=c.batch_size, image_size=c.data.image_size,
            num_labels=c.data.num_labels, seed=c.seed, labels_path=labels_path,
            crop_scale=tuple(c.data.crop_scale), flip=c.data.flip,
            workers=c.data.workers)
        self.iterator = iter(self.dataset)

    def next(self):
        batch = next(self.iterator)
        self._unsaid += self.skipped.add(batch)
        labels = batch["labels"][:, :self.c.data.num_labels]
        return self._global(batch["image"], labels)

    def get_state(self):
        return {"iterator": self.iterator.get_state(), "skipped": self.skipped.count}

    def set_state(self, state):
        self.iterator.set_state(state["iterator"])
        self.skipped.count = state["skipped"]


def make_train_input(c, sharding, source=None):
    """The trainer's input for config `c`: synthetic, or `source` (`open_source`) through grain."""
    if c.data.source == "synthetic":
        return SyntheticInput(c, sharding)
    return GrainInput(c, sharding, source)


def image_dtype(c):
    return np.float32 if c.data.source == "synthetic" else np.uint8
