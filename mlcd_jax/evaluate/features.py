"""Frozen features of a dataset for evaluation, periodic evals and LiT: the encoder's embeddings
of every readable image (the one embedding loop, `labels.embed.embeddings`), in memory or
streamed to disk, with each row's label and record; raw-pixel features, the baseline. Row-wise
L2 normalisation: `labels.store.normalize`."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from tqdm import tqdm

from mlcd_jax.data import pipeline, transforms
from mlcd_jax.labels import embed


def extract(model, source, *, image_size: int, batch_size: int = 256, mesh=None,
            desc: str = "features", native: transforms.Native | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, D) float32, labels (n,), records (n,)) of the readable records of `source`
    in order: the source's own labels, and which record each row is (captions and names are
    found by it: an unreadable image moves nothing onto another). `native`: at native
    resolution."""
    feats, labels, rows, skipped = [], [], [], pipeline.Skipped(source)
    with tqdm(total=len(source), desc=desc, unit="img") as bar:
        for x, batch in embed.embeddings(model, source, image_size=image_size,
                                         batch_size=batch_size, mesh=mesh, skipped=skipped,
                                         native=native):
            feats.append(x)
            labels.append(batch["labels"][:, 0])
            rows.append(batch["index"])
            bar.update(len(x) + int(batch["skipped"].sum()))
    _say_skipped(desc, skipped)
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(rows).astype(np.int64)


def extract_to(model, source, path: pathlib.Path, *, image_size: int, batch_size: int = 256,
               mesh=None, desc: str = "features", rows=None, write: bool = True,
               native: transforms.Native | None = None) -> int:
    """`extract`, streamed to disk: the features into `path` (.npy), the labels into PATH.labels.npy
    and each row's record into PATH.records.npy, each filled through a memory map batch by batch,
    cut to the rows made and renamed into place at the end, so memory holds one batch whatever the
    data's size. `rows` (optional) maps each batch of features first (e.g. L2 normalisation);
    `native`: at native resolution. Every process of a job takes part (the forward is split over the
    mesh); only those with `write` write. Returns the rows made (fewer than the source's records
    where images were unreadable: they are left out, named)."""
    finals = (path, path.with_suffix(".labels.npy"), path.with_suffix(".records.npy"))
    tmp = [p.with_name(p.name + ".tmp") for p in finals]
    out, done, skipped = None, 0, pipeline.Skipped(source)
    with tqdm(total=len(source), desc=desc, unit="img") as bar:
        for x, batch in embed.embeddings(model, source, image_size=image_size,
                                         batch_size=batch_size, mesh=mesh, skipped=skipped,
                                         native=native):
            x = rows(x) if rows is not None else x
            if write and out is None:
                out = [np.lib.format.open_memmap(t, "w+", dtype, (len(source),) + shape)
                       for t, dtype, shape in zip(tmp, (np.float32, np.int32, np.int64),
                                                  ((x.shape[1],), (), ()))]
            if write:
                for o, v in zip(out, (x, batch["labels"][:, 0], batch["index"])):
                    o[done:done + len(x)] = v
            done += len(x)
            bar.update(len(x) + int(batch["skipped"].sum()))
    _say_skipped(desc, skipped)
    if out is not None:
        for array in out:
            array.flush()
        del out
        for t, final in zip(tmp, finals):
            if done < len(source):  # unreadable images left out: the files cut to the rows made
                whole = np.load(t, mmap_mode="r")
                write_npy_prefix(final, whole, done)
                del whole
                t.unlink()
            else:
                t.replace(final)
    return done


def write_npy_prefix(path: pathlib.Path, array: np.ndarray, rows: int, chunk: int = 1 << 16):
    """The first `rows` rows of `array` (memory-mapped) as a new .npy, a chunk at a time."""
    out = np.lib.format.open_memmap(path.with_name(path.name + ".part"), "w+", array.dtype,
                                    (rows,) + array.shape[1:])
    for s in range(0, rows, chunk):
        out[s:s + chunk] = array[s:min(rows, s + chunk)]
    out.flush()
    del out
    path.with_name(path.name + ".part").replace(path)


def _say_skipped(desc: str, skipped: pipeline.Skipped) -> None:
    if skipped.count and jax.process_index() == 0:
        print(f"{desc}: {skipped.summary()}; left out of the evaluation", flush=True)


def pixels(source, *, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw-pixel features: the eval transform's image in grayscale (mean of the channels),
    flattened, in [0, 1]."""
    ds = pipeline.dataset(source, batch_size=512, image_size=image_size, num_labels=1, seed=0,
                          train=False, process_index=0, process_count=1)
    batches, skipped = list(ds), pipeline.Skipped(source)
    for b in batches:
        skipped.add(b)
    _say_skipped("raw pixels", skipped)
    x = np.concatenate([b["image"].mean(-1).reshape(len(b["image"]), -1) for b in batches]) / 255.0
    return x.astype(np.float32), np.concatenate([b["labels"][:, 0] for b in batches])
