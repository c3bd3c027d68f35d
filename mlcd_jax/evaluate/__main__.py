"""Evaluate a frozen encoder: python -m mlcd_jax.evaluate (--workdir RUN | --model DIR) --dataset ...

    python -m mlcd_jax.evaluate --workdir runs/tiny --dataset digits
    python -m mlcd_jax.evaluate --model MODEL_DIR --dataset tfds --tfds_name cifar10 --test_split test

Linear probe (CLIP protocol) and kNN (k = 20, T = 0.07) accuracy on a held-out split; prints a
table and writes JSON (default: RUN/eval.json, or ./eval.json).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import types

import ml_collections
import numpy as np

from mlcd_jax.evaluate import features, probes


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


def load_from_workdir(workdir):
    """The encoder of a trainer workdir: its resolved config.json and latest checkpoint."""
    import jax
    from flax import nnx
    from mlcd_jax import checkpoint, config as config_lib
    from mlcd_jax.models import vit
    workdir = pathlib.Path(workdir).absolute()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: --workdir must be a training workdir")
    c = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: train first")
    # The run may have used another device count: restore every array onto this process's first
    # device, shapes from the checkpoint's metadata.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          ckpt.manager.item_metadata(step)["state"])
    state, _ = ckpt.restore(target, step)
    ckpt.close()
    cfg = config_lib.vit_config(c)
    model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, state["params"]["encoder"]), step


def evaluate(model, train, test, *, image_size: int, mesh=None) -> dict:
    train_x, train_y = features.extract(model, train, image_size=image_size, mesh=mesh,
                                        desc="features (train)")
    test_x, test_y = features.extract(model, test, image_size=image_size, mesh=mesh,
                                      desc="features (test)")
    return {"linear_probe": probes.linear_probe(train_x, train_y, test_x, test_y),
            "knn": probes.knn(train_x, train_y, test_x, test_y)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlcd_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--workdir", help="a training workdir (latest checkpoint)")
    who.add_argument("--model", help="our model dir or a transformers checkpoint dir")
    p.add_argument("--dataset", required=True, choices=["digits", "folder", "arrayrecord", "tfds"])
    p.add_argument("--path", default="")
    p.add_argument("--tfds_name", default="")
    p.add_argument("--train_split", default="train")
    p.add_argument("--test_split", default="", help="tfds split; else --test_fraction held out")
    p.add_argument("--test_fraction", type=float, default=0.3)
    p.add_argument("--image_size", type=int, default=0, help="default: the model's")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    try:
        from mlcd_jax.data import sources
        from mlcd_jax.labels import embed
        if a.workdir:
            model, step = load_from_workdir(a.workdir)
            what = f"{a.workdir} (step {step})"
        else:
            model, what = embed.load_encoder(a.model), a.model
        spec = lambda split: types.SimpleNamespace(source=a.dataset, path=a.path,
                                                   tfds_name=a.tfds_name, split=split)
        if a.test_split:
            train, test = sources.make_source(spec(a.train_split)), sources.make_source(spec(a.test_split))
        else:
            train, test = split(sources.make_source(spec(a.train_split)), a.test_fraction)
        size = a.image_size or model.cfg.image_hw[0]
        result = evaluate(model, train, test, image_size=size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result |= {"model": what, "dataset": a.dataset, "train": len(train), "test": len(test)}
    print(f"{what} on {a.dataset} ({len(train)} train / {len(test)} test): linear probe "
          f"{result['linear_probe']['accuracy']:.4f}, kNN {result['knn']['accuracy']:.4f}")
    out = pathlib.Path(a.out or (pathlib.Path(a.workdir) / "eval.json" if a.workdir else "eval.json"))
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
