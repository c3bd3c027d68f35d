"""L2-normalised embeddings of a dataset with an encoder, written as float16 shards + manifest.

Shard i holds records [i·S, (i+1)·S) in source order (eval transform: resize + center crop), is
made by process i % process_count, written atomically with a record of what made it (the source's
records, the model's weights, the image size), and never redone; the manifest is written (last) by
process 0 once every shard exists. An --out that holds shards made otherwise is refused, not mixed.
"""

from __future__ import annotations

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mlcd_jax import distributed
from mlcd_jax.data import pipeline, sources, transforms
from mlcd_jax.labels import store


def model_fingerprint(params) -> str:
    """Changes when any weight changes (the model dir's name may stay)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).data)
    return h.hexdigest()[:16]


def run(source, model, out_dir, *, model_name: str, image_size: int, batch_size: int = 256,
        shard_size: int = 100_000, process_index: int = 0, process_count: int = 1,
        source_name: str = "") -> dict:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphdef, params = nnx.split(model)

    @jax.jit
    def embed(params, images):
        e = nnx.merge(graphdef, params)(transforms.normalize(images.astype(jnp.float32))).embedding
        e = e.astype(jnp.float32)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    n = len(source)
    bounds = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    names = [f"emb_{i:05d}.npy" for i in range(len(bounds))]
    made_by = store.digest(source.fingerprint(), model_fingerprint(params), image_size)
    fingerprints = [store.digest(made_by, a, b) for a, b in bounds]
    _refuse_other_runs(out, names, fingerprints)
    todo = [i for i in range(len(bounds)) if i % process_count == process_index
            and store.piece_record(out / names[i]) is None]
    with tqdm(total=sum(bounds[i][1] - bounds[i][0] for i in todo), desc="embed", unit="img") as bar:
        for i in todo:
            shard = sources.Subset(source, range(*bounds[i]))
            ds = pipeline.dataset(shard, batch_size=batch_size, image_size=image_size,
                                  num_labels=1, seed=0, train=False, process_index=0,
                                  process_count=1)
            parts, skipped = [], pipeline.Skipped(shard)
            for batch in ds:
                skipped.add(batch)
                images = batch["image"]
                pad = batch_size - len(images)  # one compiled shape
                padded = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
                parts.append(np.asarray(embed(params, padded))[:len(images)].astype(np.float16))
                bar.update(len(images) + int(batch["skipped"].sum()))
            if skipped.count:
                raise ValueError(
                    f"embed: records {bounds[i][0]}–{bounds[i][1] - 1}: {skipped.summary()}. Every "
                    "record needs an embedding (its index is its label row): make the dataset "
                    "without them (`python -m mlcd_jax.data.convert` leaves unreadable images out) "
                    f"and embed that into a new --out; the {i} shards before are kept")
            store.write_piece(out / names[i], np.concatenate(parts),
                              {"fingerprint": fingerprints[i], "records": list(bounds[i])})
    distributed.barrier("embed: shards written")  # in a multi-process job, process 0 then indexes
    done = all(store.piece_record(out / f) is not None for f in names)
    if process_index == 0 and done:
        width = int(np.load(out / names[0], mmap_mode="r").shape[1])
        store.write_json_atomic(out / "manifest.json", {
            "shards": [{"file": f, "count": b - a, "fingerprint": fp}
                       for f, (a, b), fp in zip(names, bounds, fingerprints)],
            "dim": width, "model": model_name, "source": source_name})
    return {"shards": len(bounds), "embedded_now": len(todo), "complete": done}


def _refuse_other_runs(out: pathlib.Path, names, fingerprints) -> None:
    """Finished shards in `out` made from other records, weights or settings are not mixed with
    this run's. (A shard without its record was cut short, or written by an older version: it is
    redone.)"""
    expected = dict(zip(names, fingerprints))
    for path in sorted(out.glob("emb_*.npy")):
        record = store.piece_record(path)
        if record is not None and record.get("fingerprint") != expected.get(path.name):
            raise ValueError(
                f"--out {out} already holds {path.name}, made from other images, another model "
                "or another --image_size/--shard_size; embed into a new --out, or delete that "
                "directory to start over")
