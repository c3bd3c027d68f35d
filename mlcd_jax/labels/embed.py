"""L2-normalised embeddings of a dataset with an encoder, written as float16 shards + manifest.

Shard i holds records [i·S, (i+1)·S) in source order (eval transform: resize + center crop), is
made by process i % process_count, written atomically, and never redone; the manifest is written
(last) by process 0 once every shard exists.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mlcd_jax import distributed
from mlcd_jax.data import pipeline, transforms
from mlcd_jax.labels import store


class _Slice:
    def __init__(self, source, start, stop):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        return self.source[self.start + i]


def load_encoder(path):
    """Our model dir (vit_config.json) or a transformers checkpoint dir (config.json)."""
    from mlcd_jax.interop import hf
    path = pathlib.Path(path)
    if (path / "vit_config.json").is_file():
        return hf.load_model_dir(path)
    if (path / "config.json").is_file():
        return hf.load_vision_model(path)
    raise FileNotFoundError(f"--model {path}: neither our model dir (vit_config.json) nor a "
                            "transformers checkpoint (config.json)")


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
    todo = [i for i in range(len(bounds))
            if i % process_count == process_index and not (out / names[i]).exists()]
    with tqdm(total=sum(bounds[i][1] - bounds[i][0] for i in todo), desc="embed", unit="img") as bar:
        for i in todo:
            ds = pipeline.dataset(_Slice(source, *bounds[i]), batch_size=batch_size,
                                  image_size=image_size, num_labels=1, seed=0, train=False,
                                  process_index=0, process_count=1)
            parts = []
            for batch in ds:
                images = batch["image"]
                if batch["skipped"].sum():
                    raise ValueError(f"embed: {int(batch['skipped'].sum())} corrupt images in "
                                     f"records {bounds[i]}: every record needs an embedding (its "
                                     "index is its label row); remove them from the dataset")
                pad = batch_size - len(images)  # one compiled shape
                padded = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
                parts.append(np.asarray(embed(params, padded))[:len(images)].astype(np.float16))
                bar.update(len(images))
            store.write_npy_atomic(out / names[i], np.concatenate(parts))
    distributed.barrier("embed: shards written")  # in a multi-process job, process 0 then indexes
    done = all((out / f).exists() for f in names)
    if process_index == 0 and done:
        width = int(np.load(out / names[0], mmap_mode="r").shape[1])
        store.write_json_atomic(out / "manifest.json", {
            "shards": [{"file": f, "count": b - a} for f, (a, b) in zip(names, bounds)],
            "dim": width, "model": model_name, "source": source_name})
    return {"shards": len(bounds), "embedded_now": len(todo), "complete": done}
