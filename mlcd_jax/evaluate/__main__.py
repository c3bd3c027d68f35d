"""Evaluate a frozen encoder: python -m mlcd_jax.evaluate (--checkpoint RUN | --model DIR) --dataset ...

    python -m mlcd_jax.evaluate --checkpoint runs/demo/mlcd --dataset digits_canvas --test_split test
    python -m mlcd_jax.evaluate --checkpoint runs/tiny --step 400 --dataset digits
    python -m mlcd_jax.evaluate --model MODEL_DIR --dataset tfds --tfds_name cifar10 --test_split test

Linear probe (CLIP protocol) and kNN (k = 20, T = 0.07) accuracy on a held-out split; prints a
table and writes JSON (default: RUN/eval.json, or ./eval.json).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from mlcd_jax.evaluate import run


def main(argv=None) -> int:
    from mlcd_jax import mesh as mesh_lib
    from mlcd_jax.data import sources
    p = argparse.ArgumentParser(prog="python -m mlcd_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", "--workdir", dest="workdir",
                     help="a training workdir (its latest checkpoint, or --step)")
    who.add_argument("--model", help="our model dir or a transformers checkpoint dir")
    p.add_argument("--step", type=int, default=None, help="with --checkpoint: which step")
    p.add_argument("--dataset", required=True, choices=sources.LABELLED)
    p.add_argument("--path", default="")
    p.add_argument("--tfds_name", default="")
    p.add_argument("--train_split", default="train")
    p.add_argument("--test_split", default="", help="the dataset's test split (tfds, "
                   "digits_canvas); else --test_fraction of the train split is held out")
    p.add_argument("--test_fraction", type=float, default=0.3)
    p.add_argument("--image_size", type=int, default=0, help="default: the model's")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    try:
        from mlcd_jax import distributed
        from mlcd_jax.labels import embed
        distributed.initialize()  # a multi-process job (mlcd_jax/distributed.py) shares the work
        if a.workdir:
            model, step = run.load_from_workdir(a.workdir, a.step)
            what = f"{a.workdir} (step {step})"
        else:
            model, what = embed.load_encoder(a.model), a.model
        train, test = run.dataset_splits(a.dataset, path=a.path, tfds_name=a.tfds_name,
                                         train_split=a.train_split, test_split=a.test_split,
                                         test_fraction=a.test_fraction)
        size = a.image_size or model.cfg.image_hw[0]
        mesh = mesh_lib.make_mesh([("data", -1)])  # batches split over every device
        result = run.evaluate(model, train, test, image_size=size, mesh=mesh)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result |= {"model": what, "dataset": a.dataset, "train": len(train), "test": len(test)}
    import jax
    if jax.process_index() != 0:  # every process computed the same result; one reports it
        return 0
    print(f"{what} on {a.dataset} ({len(train)} train / {len(test)} test): linear probe "
          f"{result['linear_probe']['accuracy']:.4f}, kNN {result['knn']['accuracy']:.4f}")
    out = pathlib.Path(a.out or (pathlib.Path(a.workdir) / "eval.json" if a.workdir else "eval.json"))
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
