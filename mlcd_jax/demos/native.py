"""Native resolution on bundled data: python -m mlcd_jax.demo --native [--workdir runs/demo_native]

The task: `digits_strips`, strips of 1–6 of scikit-learn's digits side by side, wide or tall, so
aspect ratios run from 1:6 to 6:1 and the task needs the whole strip: how many digits, and which.
The teacher, standing in for CLIP, sees each clean 8 × 8 digit of a strip; spherical k-means of
those glyphs (K = 64) and each digit's nearest center give every strip several labels (MLCD's
several concepts per image: up to 6, one per distinct cluster of its digits).
Three pretrainings with the same token budget (64 patches of 4 px), ViT, head, labels and steps
(configs/demo_native.py): square (32 × 32 crops, as CLIP preprocesses), squash (the whole strip
resized to 32 × 32, its shape lost) and native (each strip at its own aspect ratio within 64
patches, NaFlex), `--seeds` seeds each. Each encoder is then probed
on the held-out strips, fed as it was trained: the count (6 classes; linear probe and kNN) and the
digits (one linear probe per digit, present or not: the share of strips whose set of digits is
exactly right, and the per-digit accuracy). Writes results.json, native.md (the table, mean ± std
over seeds, with images/s and padding from the runs' metrics) and native.png to the workdir.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from mlcd_jax.config import presets
from mlcd_jax.data import record_keys, sources
from mlcd_jax.demos import runs as demo_runs
from mlcd_jax.evaluate import features, probes
from mlcd_jax.interop import weights
from mlcd_jax.labels import kmeans, store
from mlcd_jax.runtime import files
from mlcd_jax.training import reporting

CONFIG = presets.path("demo_native")
KINDS = ("square", "squash", "native")
K, L = 64, 6  # glyph clusters; labels per strip (one per distinct cluster of its ≤ 6 digits)


def teacher_labels(workdir: pathlib.Path, train) -> pathlib.Path:
    """MLCD's labels, several concepts per image: the teacher embeds each digit of each training
    strip alone (its clean 8 × 8 pixels, keyed STRIP_KEY#slot); spherical k-means clusters them
    into K (k-means++ seeds, the best of 3, as the demo); a strip's labels are its digits'
    nearest centers, each once, in reading order, −1 after (l = 6). A keyed label store, made
    once."""
    out = workdir / "labels"
    if (out / "manifest.json").is_file():
        return out
    slots = [(i, k) for i, digits in enumerate(train.digits) for k in range(len(digits))]
    glyphs = np.stack([train.clean[i, 64 * k:64 * (k + 1)] for i, k in slots]).astype(np.float32)
    emb = store.write_embeddings(workdir / "teacher", [glyphs], model="clean-digit-pixels",
                                 keys=[[f"{train.key(i)}#{k}" for i, k in slots]])
    centers, _ = kmeans.fit(emb, K, points_per_center=256, niter=30, init="kmeans++", nredo=3,
                            verbose=False)
    nearest = np.argmax(store.normalize(glyphs) @ centers.T, axis=1)
    labels = np.full((len(train), L), -1, np.int32)
    for (i, _), center in zip(slots, nearest):
        row = labels[i]
        if center not in row:
            row[np.argmax(row < 0)] = center
    out.mkdir(parents=True, exist_ok=True)
    files.write_npy_atomic(out / "labels.npy", labels)
    hashed = [record_keys.hashes(train.key(i) for i in range(len(train)))]
    record_keys.build(out / "keys.npy", hashed, len(train))
    store.write_label_manifest(out, num_examples=len(train), num_classes=K, num_labels=L,
                               embeddings=emb, index="each digit's nearest center",
                               recall_at_l=1.0, keys="keys.npy")
    return out


def pretrain(workdir: pathlib.Path, kind: str, seed: int, labels: pathlib.Path,
             overrides=()) -> pathlib.Path:
    run = workdir / "runs" / kind / f"seed{seed}"
    if not (run / "probes.json").is_file():
        demo_runs.train([f"--config={CONFIG}:{kind}", f"--workdir={run}",
                         f"--config.seed={seed}", f"--config.data.labels={labels}", *overrides])
    return run


def digit_sets(source) -> np.ndarray:
    """(n, 10) bool: which digits each strip holds."""
    present = np.zeros((len(source), 10), bool)
    for i, digits in enumerate(source.digits):
        present[i, list(digits)] = True
    return present


def probe(run: pathlib.Path, train, test) -> dict:
    """The run's encoder on the held-out strips, fed as it was trained (square crops or native
    resolution); the count and digit probes, and the run's speed and padding."""
    done = run / "probes.json"
    if done.is_file():
        return json.loads(done.read_text())
    encoder, _ = weights.load_encoder(run)
    native = weights.native_sizing(run)  # None: square crops, as it trained
    extract = lambda source, split: features.extract(
        encoder, source, image_size=32, native=native,
        desc=f"{run.parent.name} seed {run.name[4:]} ({split})")
    train_x, train_y, _ = extract(train, "train")
    test_x, test_y, _ = extract(test, "test")
    count = probes.linear_probe(train_x, train_y, test_x, test_y)
    count_knn = probes.knn(train_x, train_y, test_x, test_y)
    have, want = digit_sets(train), digit_sets(test)
    predicted = np.stack([probes.linear_probe(train_x, have[:, d], test_x, want[:, d],
                                              predictions=True)["predictions"]
                          for d in range(10)], axis=1)
    logged = reporting.read_jsonl(run / "metrics.jsonl")
    logged = logged[1:] or logged  # the first lap includes warm-up
    result = {"count_linear": count["accuracy"], "count_knn": count_knn["accuracy"],
              "digits_exact": float((predicted == want).all(1).mean()),
              "digits_each": float((predicted == want).mean()),
              "images_per_s": float(np.mean([r["images_per_s"] for r in logged])),
              "padding": float(np.mean([r.get("padding", 0.0) for r in logged]))}
    done.write_text(json.dumps(result, indent=2))
    return result


COLUMNS = [("count_linear", "count: linear"), ("count_knn", "count: kNN"),
           ("digits_exact", "digits: set exact"), ("digits_each", "digits: each"),
           ("images_per_s", "train images/s"), ("padding", "padding")]
NAMES = {"square": "square: 32 × 32 crops (64 patches)",
         "squash": "squash: whole strip to 32 × 32 (64 patches)",
         "native": "native: own aspect ratio, ≤ 64 patches (NaFlex)"}


def plot(summary: dict, train, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k, _ in COLUMNS[:4]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(KINDS)
    for j, kind in enumerate(KINDS):
        means = [np.mean(summary[kind][k]) for k in keys]
        stds = [np.std(summary[kind][k]) for k in keys]
        ax.bar(np.arange(len(keys)) + j * width, means, width, yerr=stds, label=NAMES[kind])
    ax.set_xticks(np.arange(len(keys)) + width * (len(KINDS) - 1) / 2,
                  [c for _, c in COLUMNS[:4]], fontsize=8)
    ax.set_ylabel("held-out accuracy"), ax.set_ylim(0, 1), ax.legend(fontsize=8)
    ax.set_title("digits_strips: square crops, squashed, native; the same 64-patch budget")
    canvas = np.full((84, 6 * 14, 3), 80, np.uint8)  # a few training strips, for the eye
    x = 0
    for i in range(40):
        image = train.images[i]
        h, w = image.shape[:2]
        if x + w > canvas.shape[1] or h > canvas.shape[0]:
            continue
        canvas[:h, x:x + w] = image
        x += w + 2
    ax2.imshow(canvas, interpolation="nearest"), ax2.axis("off")
    ax2.set_title("training strips (1–6 digits, wide or tall)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(workdir, *, seeds: int, overrides=()) -> None:
    """The native-resolution demo (see the module's docstring): `seeds` runs of each kind,
    `overrides` (trainer flags) for every run."""
    start = time.time()
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    train, test = sources.DigitsStripsSource("train"), sources.DigitsStripsSource("test")
    print(f"[1/3] teacher: each strip's clean digits → k-means K = {K} → each digit's nearest "
          "center as the strip's labels", flush=True)
    labels = teacher_labels(workdir, train)
    summary = demo_runs.sweep(KINDS, seeds,
                              lambda kind, seed: pretrain(workdir, kind, seed, labels, overrides),
                              lambda run: probe(run, train, test))
    text = demo_runs.table(summary, seeds, COLUMNS, NAMES, whole=("images_per_s",))
    (workdir / "native.md").write_text(text + "\n")
    (workdir / "results.json").write_text(json.dumps(
        {"runs": summary, "seeds": seeds, "wall_s": time.time() - start}, indent=2))
    plot(summary, train, workdir / "native.png")
    print("\n" + text)
    print(f"\n{time.time() - start:.0f} s; wrote {workdir / 'results.json'}, native.md, "
          "native.png")
