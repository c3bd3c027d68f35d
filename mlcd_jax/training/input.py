"""The trainer's input: global (images, labels) arrays of each step, and a checkpointable state.

Batches are laid out (grad_accum, micro, ...) with `micro` split over the mesh's batch axes; each
process supplies its own rows (`jax.make_array_from_process_local_data`). A thread makes the next
`PREFETCH` batches (reading, decoding through grain's workers, the copy to the devices) while the
devices run the current step; `next` also says how long the devices sat idle waiting for it.
"""

from __future__ import annotations

import queue
import threading
import time

import jax
import numpy as np

from mlcd_jax.data import pipeline, sources, synthetic, transforms
from mlcd_jax.labels import join, store
from mlcd_jax.runtime import backend
from mlcd_jax.runtime.errors import UserError

PREFETCH = 2  # batches made ahead, on the devices (≥ 2)


def open_source(c):
    """The config's real data source (None for synthetic data): opened, and so checked, first."""
    return None if c.data.source == "synthetic" else sources.make_source(c.data)


def join_labels(c, source) -> join.Joined | None:
    """The records of `source` joined with config.data.labels by key (`labels/join.py`; the
    store opened and checked once, here). None: synthetic data, or the source's own classes."""
    if source is None or not c.data.labels:
        return None
    labels = store.open_label_store(c.data.labels, num_classes=c.head.num_classes)
    if labels.labels.shape[1] < c.data.num_labels:
        raise UserError(f"{labels.path} has {labels.labels.shape[1]} labels per example "
                        f"but config.data.num_labels = {c.data.num_labels}")
    store.check_label_range(labels)
    return join.join(source, labels, missing=c.data.missing_labels)


def num_workers(c) -> int:
    """grain worker processes: config.data.workers, or (-1, automatic) this process's cores when
    the devices are accelerators, none when they are CPUs (they compute the step on those
    cores)."""
    return backend.data_workers(c.data.workers)


class _Input:
    """Prefetching, state and skips; subclasses make host batches (`_make`) and have a state
    (`_state`, `_set_state`) that a checkpoint keeps: the one after the last batch consumed."""

    def __init__(self, c, sharding, source=None):
        self.c, self.sharding = c, sharding
        self.shape = (c.grad_accum, c.batch_size // c.grad_accum)
        self.skipped = pipeline.Skipped(source, keep=100)  # unreadable images skipped so far
        self._unsaid: list[str] = []
        self._queue: queue.Queue | None = None
        self._consumed_state = None

    def log_values(self) -> dict[str, float]:
        return {"skipped_images": self.skipped.count}

    def messages(self) -> list[str]:
        """A line for each skipped image not named by an earlier call."""
        new, self._unsaid = self._unsaid, []
        return [f"skipped an unreadable image: {name}" for name in new]

    def _global(self, batch):
        """This process's rows of every array of `batch` → global arrays (grad_accum, micro,
        ...), split over the batch axes."""
        local = self.shape[0], self.shape[1] // jax.process_count()
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self.sharding, x.reshape(local + x.shape[1:])), batch)

    def _produce(self):
        """The prefetching thread: (device batch, skip info, state after it), or the error."""
        try:
            while True:
                batch, skips = self._make()
                self._queue.put((self._global(batch), skips, self._state()))
        except BaseException as e:  # noqa: B036 (the consumer re-raises it)
            self._queue.put(e)

    def next(self, in_flight: jax.Array | None = None):
        """(batch, idle seconds): the next global batch, and how long the devices sat idle
        waiting for it (from when `in_flight`, an output of the step now running, was ready)."""
        if self._queue is None:
            self._consumed_state = self._state()
            self._queue = queue.Queue(maxsize=PREFETCH - 1)  # + one waiting to be put
            threading.Thread(target=self._produce, daemon=True, name="prefetch").start()
        idle_since = None
        while True:
            try:
                item = self._queue.get(timeout=0.002)
                break
            except queue.Empty:
                if idle_since is None and (in_flight is None or in_flight.is_ready()):
                    idle_since = time.perf_counter()
        if isinstance(item, BaseException):
            raise item
        batch, skips, self._consumed_state = item
        if skips is not None:
            self._unsaid += self.skipped.add(skips)
        return batch, time.perf_counter() - idle_since if idle_since is not None else 0.0

    def get_state(self):
        state = self._consumed_state if self._queue is not None else self._state()
        return {"input": state, "skipped": self.skipped.count}

    def set_state(self, state):
        if self._queue is not None:
            raise RuntimeError("set_state after the first batch: the prefetched ones would be lost")
        # Checkpoints written before prefetching: {"step"} (synthetic), {"iterator", "skipped"}.
        self._set_state(state["input"] if "input" in state else state.get("iterator", state))
        self.skipped.count = state.get("skipped", 0)


class SyntheticInput(_Input):
    """Batch `step` is a pure function of (seed, step): the state is the step."""

    def __init__(self, c, sharding, source=None, native=None):
        super().__init__(c, sharding)
        self.native = native
        self.source = synthetic.SyntheticSource(
            num_classes=c.head.num_classes, num_labels=c.data.num_labels,
            image_size=c.data.image_size, noise=c.data.noise, seed=c.seed)
        self.step = 0

    def _make(self):
        per = self.shape[1] // jax.process_count()
        rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
        batch = self.source.batch(self.step, self.shape, rows)
        if self.c.heads:  # the region heads' slots: synthetic boxes and labels
            boxes, labels = self.source.regions(
                self.step, self.shape, rows, self.c.data.regions_per_image,
                {name: (h.num_classes, h.num_labels) for name, h in self.c.heads.items()})
            batch += ({"boxes": boxes, "labels": labels},)
        self.step += 1
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        batch = jax.tree.map(flat, batch)
        if self.native is not None:  # each square image as a full grid of patches, padded
            rows = [transforms.patchify(x, self.native.patch, self.native.max_tokens)
                    for x in batch[0]]
            batch = (dict(zip(pipeline.PATCH_FIELDS, map(np.stack, zip(*rows)))), *batch[1:])
        return batch, None

    def _state(self):
        return {"step": self.step}

    def _set_state(self, state):
        self.step = state["step"]


class GrainInput(_Input):
    """A real source through the grain pipeline, each record with its labels (`joined`: the
    label store's rows by key, `join_labels`; None: the source's own class)."""

    def __init__(self, c, sharding, source, joined=None, regions=None, native=None):
        source = source if joined is None else joined.source  # records without labels skipped
        super().__init__(c, sharding, source)
        self.joined, self.regions, self.native = joined, regions, native
        self.dataset = pipeline.dataset(
            source, batch_size=c.batch_size, image_size=c.data.image_size,
            num_labels=c.data.num_labels, seed=c.seed, labels=joined,
            crop_scale=tuple(c.data.crop_scale), flip=c.data.flip, workers=num_workers(c),
            regions=regions, regions_per_image=c.data.regions_per_image, native=native)
        self.iterator = iter(self.dataset)

    def log_values(self) -> dict[str, float]:
        missing = {} if self.joined is None or not self.joined.missing else {
            "records_without_labels": self.joined.missing}
        return super().log_values() | missing

    def _make(self):
        batch = next(self.iterator)
        skips = {k: batch[k] for k in ("skipped", "skipped_index")}
        images = (batch["image"] if self.native is None
                  else {k: batch[k] for k in pipeline.PATCH_FIELDS})
        out = (images, batch["labels"][:, :self.c.data.num_labels])
        if self.regions:
            out += ({"boxes": batch["boxes"], "labels": {
                name: batch[f"region_labels/{name}"][..., :self.c.heads[name].num_labels]
                for name in self.regions}},)
        return out, skips

    def _state(self):
        return self.iterator.get_state()

    def _set_state(self, state):
        self.iterator.set_state(state)


def join_regions(c, joined, source) -> dict:
    """Each region head's regions of the records that train (`labels.join.join_regions`: its
    region label store joined by the regions' keys), {name: JoinedRegions}; {} without region
    heads or for synthetic data."""
    if source is None or not c.heads:
        return {}
    records = source if joined is None else joined.source
    found = {}
    for name, h in c.heads.items():
        labels = store.open_label_store(h.labels, num_classes=h.num_classes) if h.labels else None
        if labels is None:
            raise UserError(f"config.heads.{name}.labels: the region label store of this head "
                            "is not set (`labels embed --regions` then `assign`, or `labels ocr`)")
        if labels.labels.shape[1] < h.num_labels:
            raise UserError(f"{labels.path} has {labels.labels.shape[1]} labels per region but "
                            f"config.heads.{name}.num_labels = {h.num_labels}")
        store.check_label_range(labels, allow_empty=True)
        found[name] = join.join_regions(records, labels, expect=h.regions,
                                        missing=h.missing_labels, field="config.data")
    return found


def make_train_input(c, sharding, source=None, joined=None, regions=None, native=None):
    """The trainer's input for config `c`: synthetic, or `source` (`open_source`) with its labels
    (`join_labels`) and its regions (`join_regions`) through grain; `native`
    (`config.native`): images at native resolution, as patches."""
    if c.data.source == "synthetic":
        return SyntheticInput(c, sharding, native=native)
    return GrainInput(c, sharding, source, joined, regions, native)


def image_dtype(c):
    return np.float32 if c.data.source == "synthetic" else np.uint8
