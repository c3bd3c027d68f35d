"""MLCD end to end on bundled data (`python -m mlcd_jax.demo`; its flags in mlcd_jax/demo.py).

The task: scikit-learn's 1,797 handwritten digits, each placed at a random scale and position on a
32 × 32 canvas (`DigitsCanvasSource`; 1,258 train / 539 held out). The teacher, standing in for
CLIP, embeds the clean, centred 8 × 8 digit (its 64 pixels, L2-normalised); the student ViT only
ever sees the canvas. Steps: teacher embeddings → spherical k-means (K = 64) → top-4 labels →
MLCD pretraining on 8 simulated devices (and single-label UNICOM with the same budget) → linear
probe and kNN on the held-out canvases for raw pixels, a random-init ViT, both pretrained ViTs and
the teacher → LiT: a text tower trained on captions of each canvas against the locked MLCD,
single-label and random-init encoders, zero-shot accuracy and retrieval R@1 on the held-out
canvases. Writes
results.json, a table, and loss / cosine curves (PNG) to the workdir.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

from mlcd_jax.config import presets
from mlcd_jax.data import sources
from mlcd_jax.demos import runs as demo_runs
from mlcd_jax.evaluate import features, run as eval_run
from mlcd_jax.interop import weights
from mlcd_jax.labels import assign, kmeans, store
from mlcd_jax.runtime import cli
from mlcd_jax.training import reporting

K, L = 64, 4
CONFIG = presets.path("demo")
LIT_CONFIG = presets.path("lit_demo")


def teacher_embeddings(workdir: pathlib.Path, train) -> store.EmbeddingShards:
    """The teacher's embeddings of the train split: each clean digit's 64 pixels, with each
    image's key (written once)."""
    directory = workdir / "teacher_embeddings"
    if (directory / "manifest.json").is_file():
        return store.open_embeddings(directory)
    emb = train.clean.reshape(len(train), -1).astype(np.float32)
    return store.write_embeddings(directory, [emb], model="clean-digit-pixels",
                                  keys=[[train.key(i) for i in range(len(train))]])


def cluster(shards: store.EmbeddingShards, k: int) -> np.ndarray:
    """The demo's spherical k-means: K centers, k-means++ seeds, the best of 3."""
    centers, _ = kmeans.fit(shards, k, points_per_center=256, niter=30, init="kmeans++", nredo=3,
                            verbose=False)
    return centers


def teacher_labels(workdir: pathlib.Path, train) -> pathlib.Path:
    """Cluster the teacher's embeddings of the train split; the trainer joins records to the
    label store by key."""
    shards = teacher_embeddings(workdir, train)
    (workdir / "labels").mkdir(parents=True, exist_ok=True)
    np.save(workdir / "labels" / "centers.npy", cluster(shards, K))
    assign.run(shards.directory, workdir / "labels" / "centers.npy", workdir / "labels",
               num_labels=L)
    return workdir / "labels"


def pretrain(workdir: pathlib.Path, kind: str, labels: pathlib.Path, overrides=()) -> None:
    demo_runs.train([f"--config={CONFIG}:{kind}", f"--workdir={workdir / kind}",
           f"--config.data.labels={labels}", *overrides])


def lit(workdir: pathlib.Path, name: str, model: pathlib.Path, overrides=()) -> dict:
    """LiT against the locked `model`; its last eval (zero-shot, retrieval)."""
    run = workdir / f"lit_{name}"
    subprocess.run([sys.executable, "-m", "mlcd_jax.lit", f"--config={LIT_CONFIG}",
                    f"--workdir={run}", f"--config.image.model={model}", *overrides],
                   check=True, env=cli.command_env())
    return reporting.read_jsonl(run / "evals.jsonl")[-1]


def plot(workdir: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    read = reporting.read_jsonl
    runs = {kind: read(workdir / kind / "metrics.jsonl") for kind in ("mlcd", "single")}
    evals = {kind: read(workdir / kind / "evals.jsonl") for kind in ("mlcd", "single")}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, rows in runs.items():
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=kind)
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.legend()
    for kind, rows in evals.items():
        ax2.plot([r["step"] for r in rows], [r["knn"] for r in rows], "o-", label=kind)
    ax2.set_xlabel("step"), ax2.set_ylabel("kNN accuracy, held-out canvases"), ax2.legend()
    fig.tight_layout()
    fig.savefig(workdir / "loss.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, rows in runs.items():
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["pos_cos"] for r in rows], label=f"{kind}: positives")
        ax.plot(steps, [r["neg_cos"] for r in rows], "--", label=f"{kind}: negatives")
    ax.set_xlabel("step"), ax.set_ylabel("mean cosine to class centers"), ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "cosine.png", dpi=100)
    plt.close("all")


def run(workdir, *, overrides=(), lit_overrides=()) -> None:
    """The demo (see the module's docstring): `overrides` (trainer flags) for both pretrainings,
    `lit_overrides` for the LiT runs."""
    start = time.time()
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    train, test = sources.DigitsCanvasSource("train"), sources.DigitsCanvasSource("test")

    print(f"[1/5] teacher embeddings (clean digits) → k-means K = {K} → top-{L} labels", flush=True)
    labels = teacher_labels(workdir, train)
    for i, kind in enumerate(("mlcd", "single")):
        print(f"[{2 + i}/5] pretraining ({kind}); the trainer names the devices", flush=True)
        pretrain(workdir, kind, labels, overrides)

    print("[4/5] evaluating on the held-out canvases", flush=True)
    from flax import nnx

    from mlcd_jax.models import vit
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG)
    spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
    demo_config = module.get_config("mlcd")
    encoders = {"random_init": vit.ViT(vit.from_config(demo_config), rngs=nnx.Rngs(0))}
    for kind, key in (("single", "single_label"), ("mlcd", "mlcd")):
        encoders[key] = weights.load_from_workdir(workdir / kind)[0]
    results = {"linear_probe": {}, "knn": {}}

    def record(name, result):
        lp, kn = result["linear_probe"]["accuracy"], result["knn"]["accuracy"]
        results["linear_probe"][name], results["knn"][name] = lp, kn
        print(f"  {name:<13} linear probe {lp:.3f}   kNN {kn:.3f}", flush=True)

    record("raw_pixels", eval_run.probe(features.pixels(train, image_size=32),
                                        features.pixels(test, image_size=32)))
    for name, model in encoders.items():
        record(name, eval_run.evaluate(model, train, test, image_size=32, desc=name))
    clean = lambda s: (s.clean.reshape(len(s), -1) / 255.0, s.labels)
    record("teacher", eval_run.probe(clean(train), clean(test)))
    print("[5/5] LiT: a text tower on captions of the training canvases, each image encoder "
          "locked", flush=True)
    weights.save_model_dir(encoders["random_init"], workdir / "random_init")
    results["zero_shot"], results["retrieval"] = {}, {}
    for name, model in (("random_init", workdir / "random_init"),
                        ("single_label", workdir / "single"), ("mlcd", workdir / "mlcd")):
        last = lit(workdir, name, model, lit_overrides)
        results["zero_shot"][name] = last["zero_shot_top1"]
        results["retrieval"][name] = {k: last[k] for k in ("image_to_text_R@1",
                                                            "text_to_image_R@1")}
    results["wall_s"] = time.time() - start
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    plot(workdir)

    order = ["raw_pixels", "random_init", "single_label", "mlcd", "teacher"]
    print(f"\n{'encoder':<14}{'linear probe':>13}{'kNN':>8}{'zero-shot':>11}{'img→txt R@1':>13}"
          f"{'txt→img R@1':>13}")
    for name in order:
        lit_cols = ""
        if name in results["zero_shot"]:
            r = results["retrieval"][name]
            lit_cols = (f"{results['zero_shot'][name]:>11.3f}{r['image_to_text_R@1']:>13.3f}"
                        f"{r['text_to_image_R@1']:>13.3f}")
        print(f"{name:<14}{results['linear_probe'][name]:>13.3f}{results['knn'][name]:>8.3f}"
              f"{lit_cols}")
    print(f"\n{results['wall_s']:.0f} s; wrote {workdir / 'results.json'}, loss.png, cosine.png")


