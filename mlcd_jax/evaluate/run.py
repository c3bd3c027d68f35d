"""Running the evaluators: a dataset's train/test splits, an encoder from a training workdir, and
linear probe + kNN on their frozen features. Used by `python -m mlcd_jax.evaluate`, by the trainer's
periodic evals (config `evals`) and by the demo."""

from __future__ import annotations

import json
import pathlib
import types

import ml_collections
import numpy as np

from mlcd_jax.evaluate import features, probes

PROBES = ("linear_probe", "knn")


class Subset:
    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


def split(source, test_fraction: float, seed: int = 0):
    """A seeded held-out split of a source without predefined splits."""
    order = np.random.default_rng(seed).permutation(len(source))
    n_test = int(round(len(source) * test_fraction))
    return Subset(source, np.sort(order[n_test:])), Subset(source, np.sort(order[:n_test]))


def dataset_splits(dataset: str, *, path: str = "", tfds_name: str = "", train_split: str = "train",
                   test_split: str = "", test_fraction: float = 0.3):
    """(train, test) sources: the dataset's own test split when `test_split` is given (tfds,
    digits_canvas), else `test_fraction` of the train split held out with a fixed seed."""
    from mlcd_jax.data import sources
    spec = lambda s: types.SimpleNamespace(source=dataset, path=path, tfds_name=tfds_name, split=s)
    if test_split:
        return sources.make_source(spec(train_split)), sources.make_source(spec(test_split))
    return split(sources.make_source(spec(train_split)), test_fraction)


def evaluate(model, train, test, *, image_size: int, mesh=None, which=PROBES,
             desc: str = "features") -> dict:
    """{probe: result} for the probes in `which`, on the encoder's embeddings."""
    unknown = set(which) - set(PROBES)
    if unknown:
        raise ValueError(f"unknown probes {sorted(unknown)}; known: {PROBES}")
    train_xy = features.extract(model, train, image_size=image_size, mesh=mesh,
                                desc=f"{desc} (train)")
    test_xy = features.extract(model, test, image_size=image_size, mesh=mesh, desc=f"{desc} (test)")
    return probe(train_xy, test_xy, which)


def probe(train_xy, test_xy, which=PROBES) -> dict:
    """{probe: result} of the probes in `which` on given (features, labels) pairs."""
    return {name: getattr(probes, name)(*train_xy, *test_xy) for name in which}


def load_from_workdir(workdir, step: int | None = None):
    """(encoder, step) of a trainer workdir: its resolved config.json and checkpoint `step`
    (default: the latest), restored onto this process's first device."""
    import jax
    from flax import nnx
    from mlcd_jax import checkpoint, config as config_lib
    from mlcd_jax.models import vit
    workdir = pathlib.Path(workdir).absolute()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: --checkpoint must be a training workdir")
    c = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.manager.all_steps():
        ckpt.close()
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                                f"{workdir / 'checkpoints'} (have {list(ckpt.manager.all_steps())})")
    # The run may have used another device count: restore every array onto this process's first
    # device, shapes from the checkpoint's metadata.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          ckpt.manager.item_metadata(step)["state"])
    state, _ = ckpt.restore(target, step)
    ckpt.close()
    model = nnx.eval_shape(lambda: vit.ViT(config_lib.vit_config(c), rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, state["params"]["encoder"]), step
