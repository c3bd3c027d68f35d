"""RICE on bundled data: python -m mlcd_jax.demo --regions [--workdir runs/demo_regions]

The task: `digits_regions` canvases (48 × 48, seen at 32 px): each holds its main digit (the
largest glyph: the image's class), one or two smaller digits (object regions, each with its digit
as its class) and a line of 2–4 small digits (a text region whose text is the digits it holds).
The teacher, standing in for CLIP, is the clean 8 × 8 glyphs: the main digit's for the image
labels, each object region's own for the region labels; a text region's labels are its text's
token ids (`labels ocr`). Three pretrainings with the same image head and step budget
(configs/demo_regions.py): image-only MLCD, + an object-region head, + an OCR head, each with
`--seeds` seeds. Each encoder is then probed on the held-out canvases: the image probe (linear,
kNN on whole images), the region probe (each object region's digit, from patch tokens pooled in
its box, and from the Region Transformer layer where the run has one) and the dense probe (each
patch's digit). Writes results.json, regions.md (the table: mean ± std over seeds) and
regions.png to the workdir.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from mlcd_jax.config import presets
from mlcd_jax.data import sources, tokenizer as tokenizer_lib
from mlcd_jax.demos import runs as demo_runs
from mlcd_jax.evaluate import regions as region_probes, run as eval_run
from mlcd_jax.interop import weights
from mlcd_jax.labels import assign, kmeans, ocr, store
from mlcd_jax.models import region

CONFIG = presets.path("demo_regions")
KINDS = ("image", "objects", "ocr")
K, L = 64, 4  # the image head's clusters and labels per image; the object head's K too


def teacher_store(workdir: pathlib.Path, name: str, rows, keys, k: int, l: int) -> pathlib.Path:
    """Embeddings of the clean glyphs `rows` (keyed), spherical k-means into K (k-means++ seeds,
    the best of 3, as the demo), top-l: a keyed label store (made once)."""
    out = workdir / "labels" / name
    if (out / "manifest.json").is_file():
        return out
    emb = store.write_embeddings(workdir / "teacher" / name,
                                 [np.stack([r.reshape(-1) for r in rows]).astype(np.float32)],
                                 model="clean-glyph-pixels", keys=[keys])
    out.mkdir(parents=True, exist_ok=True)
    centers, _ = kmeans.fit(emb, k, points_per_center=256, niter=30, init="kmeans++", nredo=3,
                            verbose=False)
    np.save(out / "centers.npy", centers)
    assign.run(emb.directory, out / "centers.npy", out, num_labels=l)
    return out


def label_stores(workdir: pathlib.Path, train) -> dict:
    """The image store (main glyph), the object-region store (each object's glyph) and the OCR
    store (each text line's token ids), with the OCR head's K (the tokenizer's vocabulary)."""
    main = [train.region_glyphs(i)[0] for i in range(len(train))]
    images = teacher_store(workdir, "images", main, [train.key(i) for i in range(len(train))],
                           K, L)
    glyphs, keys = [], []
    for i in range(len(train)):
        regions = train.regions(i)
        for glyph, text, key in zip(train.region_glyphs(i), regions.texts,
                                    regions.keys(train.key(i))):
            if text is None:  # an object region: its digit's clean glyph
                glyphs.append(glyph)
                keys.append(key)
    objects = teacher_store(workdir, "objects", glyphs, keys, K, 1)
    # CLIP's pre-tokenizer splits numbers into digits; with no merges (the least vocabulary
    # the BPE allows: the bytes, the 10 digits' word ends and two specials) each digit is one
    # token, so a line's tags are the digits it holds.
    vocab = 2 + len(tokenizer_lib.pre_tokenizers.ByteLevel.alphabet()) + 10
    texts = workdir / "labels" / "ocr"
    if not (texts / "manifest.json").is_file():
        ocr.run(train, texts, num_labels=L, vocab_size=vocab)
    return {"images": images, "objects": objects, "ocr": texts,
            "vocab": store.open_label_store(texts).num_classes}


def pretrain(workdir: pathlib.Path, kind: str, seed: int, stores: dict,
             overrides=()) -> pathlib.Path:
    run = workdir / "runs" / kind / f"seed{seed}"
    flags = [f"--config={CONFIG}:{kind}", f"--workdir={run}", f"--config.seed={seed}",
             f"--config.data.labels={stores['images']}"]
    if kind in ("objects", "ocr"):
        flags.append(f"--config.heads.objects.labels={stores['objects']}")
    if kind == "ocr":
        flags += [f"--config.heads.ocr.labels={stores['ocr']}",
                  f"--config.heads.ocr.num_classes={stores['vocab']}"]
    if not (run / "probes.json").is_file():
        demo_runs.train([*flags, *overrides])
    return run


def probe(run: pathlib.Path, train, test, max_patches: int) -> dict:
    """The run's encoder (and region layers) on the held-out canvases, at 32 px."""
    done = run / "probes.json"
    if done.is_file():
        return json.loads(done.read_text())
    encoder, _ = weights.load_encoder(run)
    layers = weights.load_region_layers(run)
    model = encoder if layers is None else region.WithRegions(encoder, layers)
    image = eval_run.evaluate(encoder, train, test, image_size=32, desc=run.parent.name)
    found = region_probes.evaluate(model, train, test, image_size=32, max_patches=max_patches)
    accuracy = lambda probes, name: probes[name]["accuracy"]
    regions = found["regions"]
    result = {"image_linear": accuracy(image, "linear_probe"),
              "image_knn": accuracy(image, "knn"),
              "region_pooled_linear": accuracy(regions["pooled_patches"], "linear_probe"),
              "region_pooled_knn": accuracy(regions["pooled_patches"], "knn"),
              "dense_linear": accuracy(found["dense"], "linear_probe")}
    if "region_layer" in regions:
        result |= {"region_layer_linear": accuracy(regions["region_layer"], "linear_probe"),
                   "region_layer_knn": accuracy(regions["region_layer"], "knn")}
    done.write_text(json.dumps(result, indent=2))
    return result


COLUMNS = [("image_linear", "image: linear"), ("image_knn", "image: kNN"),
           ("region_pooled_linear", "region (pooled patches): linear"),
           ("region_pooled_knn", "region (pooled): kNN"),
           ("region_layer_linear", "region (region layer): linear"),
           ("dense_linear", "dense: linear")]
NAMES = {"image": "MLCD, whole images", "objects": "+ object regions",
         "ocr": "+ object and OCR regions"}


def plot(summary: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k, _ in COLUMNS]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(KINDS)
    for j, kind in enumerate(KINDS):
        means = [np.mean(summary[kind][k]) if k in summary[kind] else 0 for k in keys]
        stds = [np.std(summary[kind][k]) if k in summary[kind] else 0 for k in keys]
        ax.bar(np.arange(len(keys)) + j * width, means, width, yerr=stds, label=NAMES[kind])
    ax.set_xticks(np.arange(len(keys)) + width, [c for _, c in COLUMNS], rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy (digits)"), ax.legend(fontsize=8)
    ax.set_title("digits_regions: what regions buy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(workdir, *, seeds: int, overrides=(), max_patches: int = 5000) -> None:
    """The region demo (see the module's docstring): `seeds` runs of each kind, `overrides`
    (trainer flags) for every run, the dense probe's patches per split at most `max_patches`."""
    start = time.time()
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    train, test = sources.DigitsRegionsSource("train"), sources.DigitsRegionsSource("test")
    print("[1/3] teacher: clean glyphs → k-means (images, object regions); text → token ids",
          flush=True)
    stores = label_stores(workdir, train)
    summary = demo_runs.sweep(KINDS, seeds,
                              lambda kind, seed: pretrain(workdir, kind, seed, stores, overrides),
                              lambda run: probe(run, train, test, max_patches))
    text = demo_runs.table(summary, seeds, COLUMNS, NAMES, whole=())
    (workdir / "regions.md").write_text(text + "\n")
    (workdir / "results.json").write_text(json.dumps(
        {"runs": summary, "seeds": seeds, "wall_s": time.time() - start}, indent=2))
    plot(summary, workdir / "regions.png")
    print("\n" + text)
    print(f"\n{time.time() - start:.0f} s; wrote {workdir / 'results.json'}, regions.md, "
          "regions.png")
