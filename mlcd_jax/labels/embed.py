"""L2-normalised embeddings of a dataset with an encoder, written as float16 shards + manifest.

Shard i holds the readable records of [i·S, (i+1)·S) in source order, with their keys beside it
(emb_i.keys.parquet: the label store joins records by them, so an unreadable image is left out and
named, not fatal). It is made with the eval transform (resize + center crop, or with --resolution
native each whole image at its native size; the batches split over this process's devices, as
evaluation's features are) by process i % process_count, written
atomically with a record of what made it (the source's records, the model's weights, the image
size), and never redone; the manifest is written (last) by process 0 once every shard exists. An
--out that holds shards made otherwise is refused, not mixed. A source without keys (ArrayRecord
files without convert's index) is embedded by position: every record must then be readable.

`--regions` embeds regions instead of images (`region_crops`): each region's crop of its record's
image, keyed f"{record key}#{region id}" (`data/regions.py`), the object regions by default (RICE
labels those by their nearest center of a k-means over the teacher's region features; OCR regions
get their text's token ids instead, `labels ocr`). The same shards, records and resumption; then
`kmeans` and `assign` make a label store keyed by region.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mlcd_jax.data import pipeline, regions as regions_lib, sources, transforms
from mlcd_jax.labels import store
from mlcd_jax.models import vit
from mlcd_jax.runtime import distributed, files, mesh as mesh_lib
from mlcd_jax.runtime.errors import UserError


def embeddings(model, source, *, image_size: int, batch_size: int = 256, mesh=None,
               skipped: pipeline.Skipped | None = None, l2_normalize: bool = False,
               native: transforms.Native | None = None):
    """(embeddings (n, D) float32, batch) of each batch of `source`, in order: the eval transform
    (`native`: each whole image at its native size, as patches), one jitted forward split over
    `mesh`'s batch axes (the last batch padded to the same shape), L2-normalised on the device if
    asked. Unreadable records are left out of the batches and counted in `skipped`. The one
    embedding loop: `labels embed`, evaluation, periodic evals and LiT run encoders through it."""
    graphdef, params = nnx.split(model)
    sharding, out_sharding = None, None
    if mesh is not None:
        shards = mesh_lib.num_batch_shards(mesh)
        batch_size = -(-batch_size // shards) * shards
        sharding = mesh_lib.batch_sharding(mesh)
        out_sharding = mesh_lib.replicated(mesh)  # every process reads all embeddings
        params = jax.tree.map(lambda x: mesh_lib.global_array(x, out_sharding), params)

    @functools.partial(jax.jit, out_shardings=out_sharding)
    def forward(params, images):
        if isinstance(images, dict):  # native resolution
            images = vit.Patches(transforms.normalize_patches(
                images["patches"].astype(jnp.float32)), images["positions"], images["mask"])
        else:
            images = transforms.normalize(images.astype(jnp.float32))
        out = nnx.merge(graphdef, params)(images)
        e = out.embedding.astype(jnp.float32)
        if l2_normalize:
            e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        return e

    for batch in pipeline.dataset(source, batch_size=batch_size, image_size=image_size,
                                  num_labels=1, seed=0, train=False, process_index=0,
                                  process_count=1, native=native):
        if skipped is not None:
            skipped.add(batch)
        n = len(batch["labels"])
        images = (batch["image"] if native is None
                  else {k: batch[k] for k in pipeline.PATCH_FIELDS})
        # One compiled shape: the last batch padded (native: with rows of padding alone).
        padded = jax.tree.map(lambda x: np.concatenate(
            [x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)]), images)
        if sharding is not None:
            padded = jax.tree.map(lambda x: mesh_lib.global_array(x, sharding), padded)
        yield np.asarray(forward(params, padded))[:n], batch


def model_fingerprint(params) -> str:
    """Changes when any weight changes (the model dir's name may stay)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).data)
    return h.hexdigest()[:16]


def with_dtype(model, dtype: str):
    """`model` computing in `dtype` (the same weights)."""
    if model.cfg.dtype == dtype:
        return model
    return vit.with_params(dataclasses.replace(model.cfg, dtype=dtype),
                           nnx.to_pure_dict(nnx.state(model)))


def region_crops(source, out_dir, kind: str = "objects") -> regions_lib.RegionCrops:
    """The regions of `kind` (objects: without a text; text; all) of `source`'s records, as a
    source of crops to embed; where each record's regions start is kept in OUT_DIR."""
    why = getattr(source, "no_regions", "this source has no boxes (folder or arrayrecord do)")
    if why is not None:
        raise UserError(f"--regions: {why}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    crops = regions_lib.RegionCrops(source, out / f"regions.{kind}.offsets.npy", kind)
    if not len(crops):
        every = regions_lib.region_offsets(source, out / "regions.all.offsets.npy", "all")
        total = int(every[len(every) - 1])
        raise UserError(f"--regions: the records hold no regions of kind {kind!r} ({total:,} "
                        "regions in all; OCR regions, those with a text, are labelled by "
                        "`labels ocr`; --region_kind all embeds every region)")
    return crops


def run(source, model, out_dir, *, model_name: str, image_size: int, batch_size: int = 256,
        shard_size: int = 100_000, process_index: int = 0, process_count: int = 1,
        source_name: str = "", mesh=None, native=None) -> dict:
    """Embed this process's share of `source` into `out_dir`, batches split over `mesh` (default:
    this process's devices; processes embed different shards, so the mesh is theirs alone);
    `native` (a `transforms.Native`): each image at native resolution."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = mesh or mesh_lib.make_mesh([("data", -1)], jax.local_devices())
    n = len(source)
    bounds = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    names = [f"emb_{i:05d}.npy" for i in range(len(bounds))]
    # The compute dtype changes the embeddings a little: part of the record (float32 records
    # keep the form they had before the dtype was a choice).
    precision = () if model.cfg.dtype == "float32" else (model.cfg.dtype,)
    sizing = () if native is None else (native.describe(),)  # square: the record it always had
    made_by = files.digest(source.fingerprint(), model_fingerprint(nnx.state(model)), image_size,
                           *precision, *sizing)
    fingerprints = [files.digest(made_by, a, b) for a, b in bounds]
    _refuse_other_runs(out, names, fingerprints)
    todo = [i for i in range(len(bounds)) if i % process_count == process_index
            and files.fresh_piece(out / names[i], fingerprints[i]) is None]
    keyed = source.unkeyed is None
    if not keyed and process_index == 0:
        print(f"embed: the records have no keys ({source.unkeyed}); the embeddings are written "
              "without them and labels will be joined by position", flush=True)
    start, skipped_total = time.perf_counter(), []
    with tqdm(total=sum(bounds[i][1] - bounds[i][0] for i in todo), desc="embed",
              unit="img") as bar:
        for i in todo:
            shard = sources.Subset(source, range(*bounds[i]))
            skipped = pipeline.Skipped(shard)
            parts, rows = [], []
            for x, batch in embeddings(model, shard, image_size=image_size,
                                       batch_size=batch_size, mesh=mesh, skipped=skipped,
                                       l2_normalize=True, native=native):
                parts.append(x.astype(np.float16))
                rows.append(batch["index"])
                bar.update(len(x) + int(batch["skipped"].sum()))
            if skipped.count and not keyed:
                raise UserError(
                    f"embed: records {bounds[i][0]}–{bounds[i][1] - 1}: {skipped.summary()}. "
                    "Without keys every record needs an embedding (its index is its label row): "
                    "make the dataset with `python -m mlcd_jax.data.convert` (it leaves unreadable "
                    f"images out and keys the rest) and embed that; the {i} shards before are kept")
            if skipped.count:
                skipped_total.append(skipped.summary())
            if keyed:  # the keys first: a shard is done when its .npy and record exist
                store.write_keys(out / store.keys_name(names[i]),
                                 (shard.key(int(r)) for r in np.concatenate(rows)))
            files.write_piece(out / names[i], np.concatenate(parts),
                              {"fingerprint": fingerprints[i], "records": list(bounds[i])})
    seconds = time.perf_counter() - start
    for line in skipped_total:  # the rest of the shard is embedded; these have no labels
        print(f"embed: left out {line}", flush=True)
    distributed.barrier("embed: shards written")  # in a multi-process job, process 0 then indexes
    done = all(files.piece_record(out / f) is not None for f in names)
    if process_index == 0 and done:
        width = int(np.load(out / names[0], mmap_mode="r").shape[1])
        store.write_embeddings_manifest(
            out, [{"file": f, "count": int(files.piece_record(out / f)["rows"]),
                   "fingerprint": fp} | ({"keys": store.keys_name(f)} if keyed else {})
                  for f, fp in zip(names, fingerprints)],
            dim=width, model=model_name, source=source_name)
    embedded = sum(bounds[i][1] - bounds[i][0] for i in todo)
    return {"shards": len(bounds), "embedded_now": len(todo), "complete": done,
            "devices": mesh.size, "dtype": model.cfg.dtype, "keyed": keyed,
            "images_per_s": round(embedded / seconds, 1) if embedded else None}


def _refuse_other_runs(out: pathlib.Path, names, fingerprints) -> None:
    """Finished shards in `out` made from other records, weights or settings are not mixed with
    this run's. (A shard without its record was cut short, or written by an older version: it is
    redone.)"""
    expected = dict(zip(names, fingerprints))
    for path in sorted(out.glob("emb_*.npy")):
        record = files.piece_record(path)
        if record is not None and record.get("fingerprint") != expected.get(path.name):
            raise UserError(
                f"--out {out} already holds {path.name}, made from other images, another model "
                "or another --image_size/--resolution/--max_tokens/--shard_size; embed into a new "
                "--out, or delete that "
                "directory to start over")
