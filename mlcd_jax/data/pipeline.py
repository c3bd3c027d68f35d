"""The grain input pipeline: source → (index, labels) → global shuffle → this process's share →
decode + augment (+ patches, at native resolution) → skip corrupt images (counted, and the first
few named by index) → batch → worker processes.

Every random choice is a function of (seed, epoch, position): the shuffle is grain's index
permutation and each example's augmentation uses grain's per-index generator. So the iterator state
is small (a position), a resumed run repeats the batches of an uninterrupted one, and the P
processes of a job read disjoint slices that together cover each epoch.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import jax
import numpy as np

from mlcd_jax.data import transforms
from mlcd_jax.runtime.errors import UserError


class LabelLookup:
    """Gives a record its labels: its row of the label store, as the trainer's join by key found
    it (`labels.join.Joined`: the row of each record; None: the source's own class as the single
    label). Labels and rows stay memory-mapped: a worker process maps the same files again, never
    a copy."""

    def __init__(self, joined, num_labels: int, num_records: int):
        self.num_labels, self.num_records = num_labels, num_records
        self.path = None if joined is None else str(joined.store.path)
        self.rows = None if joined is None else joined.rows
        self._labels = None if joined is None else joined.store.labels

    def __call__(self, index: int, record: dict) -> dict:
        index %= self.num_records  # after repeat(), positions run past the source's length
        if self.path is None:
            labels = np.full((self.num_labels,), -1, np.int32)
            labels[0] = record.get("label", -1)
        else:
            if self._labels is None:  # in a worker process
                self._labels = np.load(self.path, mmap_mode="r")
            row = index if self.rows is None else int(self.rows[index])
            labels = np.asarray(self._labels[row], np.int32)
        return {**record, "index": index, "labels": labels}

    def __getstate__(self):
        return self.__dict__ | {"_labels": None}


class RegionLookup:
    """Gives a record its regions for the region heads: `heads` {name: regions joined with that
    head's label store (`labels.join.JoinedRegions`)}; every head sees the same boxes (the
    record's), each its own labels (-1 where its store has none for a region)."""

    def __init__(self, heads: dict, num_records: int):
        self.heads, self.num_records = heads, num_records

    def __call__(self, index: int, record: dict) -> dict:
        found = {name: joined(index % self.num_records) for name, joined in self.heads.items()}
        boxes = next(iter(found.values())).boxes
        return {**record, "regions": (boxes, {name: r.labels for name, r in found.items()})}


def region_slots(regions, slots: int, rng: np.random.Generator):
    """`slots` of a record's regions (boxes (n, 4), {head: labels (n, l)}): a random subset when
    it has more, all of them repeated in a random order when fewer (RICE §3.1: "subsampled, or
    repeated"); none: every slot padding (box 0, labels −1). Returns (boxes, labels, taken)."""
    boxes, labels = regions
    n = len(boxes)
    if n == 0:
        return (np.zeros((slots, 4), np.float32),
                {h: np.full((slots, l.shape[1]), -1, np.int32) for h, l in labels.items()},
                np.zeros(slots, bool))
    order = rng.permutation(n)
    taken = order[:slots] if n >= slots else np.resize(order, slots)
    return boxes[taken], {h: np.asarray(l[taken], np.int32) for h, l in labels.items()}, \
        np.ones(slots, bool)


def _augment(record: dict, rng: np.random.Generator, *, size: int, scale, flip: bool,
             train: bool, regions_per_image: int = 0,
             native: transforms.Native | None = None) -> dict:
    """The record's image cropped (and its regions' boxes with it: a region mostly cropped away
    becomes padding, its labels −1); at native resolution, cut into patches here (in the worker
    processes) with their positions and mask."""
    boxes = None
    if "regions" in record:
        boxes, region_labels, real = region_slots(record["regions"], regions_per_image, rng)
    try:
        if native is not None:
            out = (transforms.native_train_transform(record, rng, native, scale, flip, boxes)
                   if train else transforms.native_eval_transform(record, native, boxes))
        else:
            out = (transforms.train_transform(record, rng, size, scale, flip, boxes) if train
                   else transforms.eval_transform(record, size, boxes))
    except transforms.CorruptImage as e:
        return {"corrupt": str(e), "index": record["index"]}
    example = {"labels": record["labels"], "index": np.int64(record["index"])}
    image = out if boxes is None else out[0]
    if native is None:
        example["image"] = image
    else:
        example |= dict(zip(PATCH_FIELDS, transforms.patchify(image, native.patch,
                                                              native.max_tokens)))
    if boxes is None:
        return example
    _, boxes, kept = out
    kept &= real
    return example | {"boxes": boxes} | {
        f"region_labels/{h}": np.where(kept[:, None], l, -1) for h, l in region_labels.items()}


PATCH_FIELDS = ("patches", "positions", "mask")  # a native batch's images (models/vit.Patches)


NAMED_SKIPS = 4  # source indices of skipped records carried per kept example (the rest counted)


class SkipCorrupt(grain.IterDataset):
    """Drops corrupt examples; each kept example carries how many were dropped just before it
    ("skipped"; a batch's sum is the number skipped while it was assembled, whatever worker made
    it) and the source indices of up to NAMED_SKIPS of them ("skipped_index", -1 padded), so the
    caller can name them (`Skipped`)."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self):
        return _SkipCorruptIterator(self._parent.__iter__())


class _SkipCorruptIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)

    def __next__(self):
        skipped = []
        while "corrupt" in (record := next(self._parent)):
            skipped.append(record["index"])
        named = np.full(NAMED_SKIPS, -1, np.int64)
        named[:min(len(skipped), NAMED_SKIPS)] = skipped[:NAMED_SKIPS]
        return {**record, "skipped": np.int32(len(skipped)), "skipped_index": named}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class Skipped:
    """The records a pass over `source` skipped as unreadable: counted, the first few named with
    their reason (each decoded again to say why)."""

    def __init__(self, source, keep: int = 10):
        self.source, self.keep = source, keep
        self.count, self.names = 0, []

    def add(self, batch) -> list[str]:
        """Count a batch's skips; returns the names it adds."""
        self.count += int(batch["skipped"].sum())
        indices = batch["skipped_index"].reshape(-1)
        new = [self._describe(int(i)) for i in indices[indices >= 0][:self.keep - len(self.names)]]
        self.names += new
        return new

    def _describe(self, i: int) -> str:
        try:
            transforms.decode(self.source[i])
            return f"{self.source.name(i)}: skipped"
        except transforms.CorruptImage as e:
            return str(e)

    def summary(self) -> str:
        shown = "; ".join(self.names[:5])
        more = " …" if self.count > min(5, len(self.names)) else ""
        return f"{self.count} unreadable images skipped ({shown}{more})"


def dataset(source, *, batch_size: int, image_size: int, num_labels: int, seed: int,
            labels=None, train: bool = True, crop_scale=(0.08, 1.0),
            flip: bool = True, workers: int = 0, process_index: int | None = None,
            process_count: int | None = None, regions: dict | None = None,
            regions_per_image: int = 0,
            native: transforms.Native | None = None) -> grain.IterDataset:
    """This process's batches: {"image": uint8 (b, S, S, 3), "labels": int32 (b, l), "index",
    "skipped", "skipped_index"}, b = batch_size / process_count; with `native` (native
    resolution) instead of "image" "patches" uint8 (b, T, p·p·3), "positions" int32 (b, T, 2)
    and "mask" bool (b, T), T = native.max_tokens (`transforms.patchify`); with `regions`
    ({head: joined regions}) also "boxes" float32 (b, N, 4) in pixels of the image (as resized)
    and "region_labels/HEAD" int32 (b, N, l_head), N = `regions_per_image`. Training repeats and
    reshuffles every epoch; evaluation reads each example once, in order (the last partial batch
    is kept)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise UserError(f"batch size {batch_size} is not divisible by {process_count} processes")
    ds = grain.MapDataset.source(source).map_with_index(
        LabelLookup(labels, num_labels, len(source)))
    if regions:
        ds = ds.map_with_index(RegionLookup(regions, len(source)))
    if train:
        ds = ds.shuffle(seed=seed).repeat()  # a new order every epoch
    ds = ds[process_index::process_count]  # disjoint shares that cover every epoch
    augment = functools.partial(_augment, size=image_size, scale=tuple(crop_scale), flip=flip,
                                train=train, regions_per_image=regions_per_image, native=native)
    ds = ds.random_map(augment, seed=seed)
    it = SkipCorrupt(ds.to_iter_dataset()).batch(batch_size // process_count, drop_remainder=train)
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it
