"""Evaluate a frozen encoder: python -m mlcd_jax.evaluate --model MODEL --source ...

    python -m mlcd_jax.evaluate --model runs/demo/mlcd --source digits_canvas --test_split test
    python -m mlcd_jax.evaluate --model RUN --step 400 --source folder --path TRAIN_DIR \\
        --test_path TEST_DIR
    python -m mlcd_jax.evaluate --model HF_OR_MODEL_DIR --source tfds --tfds_name cifar10 \\
        --test_split test

    python -m mlcd_jax.evaluate --model RUN --text_model LIT/text_model --source ...

    python -m mlcd_jax.evaluate --model RUN --source digits_regions --test_split test --regions
    python -m mlcd_jax.evaluate --model MODEL --regions --source arrayrecord \\
        --path 'data/train-*.array_record' --test_path 'data/val-*.array_record'

MODEL: a training workdir (its latest checkpoint, or --step), our model dir, or a transformers
MLCD/CLIP checkpoint dir. Images are fed as the model was trained or exported (square crops, or
native resolution: --resolution/--max_tokens override). Linear probe (CLIP protocol) and kNN
(k = 20, T = 0.07) accuracy on held-out images, with raw pixels (grayscale, at most 32 × 32) as
the baseline beside it; with --text_model (a LiT run's text_model dir, or any transformers CLIP
text model dir with its tokenizer.json), zero-shot accuracy (class names in --prompt templates,
averaged) and image–text retrieval Recall@1/5/10 (captions from --template). With --regions (images
with boxes whose regions have classes: digits_regions, ArrayRecord files converted with --regions
from COCO-style annotations, a folder with --annotations), a region probe (linear and kNN on each
region's embedding: patch tokens pooled in its box, and the Region Transformer layer's where the
encoder has one) and a dense probe (each patch classified as the region holding it), train regions
against test regions (mlcd_jax/evaluate/regions.py); images without classes skip the image-level
probes. Prints a table and writes JSON ({"linear_probe", "knn", "raw_pixels", "text": {...},
"regions": {"pooled_patches", "region_layer"?, ...}, "dense": {...}, ...}) to --out; without it, a
training workdir gets MODEL/eval.json, and any other model only the printed table.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from mlcd_jax.config.schema import LABELLED
from mlcd_jax.runtime import cli

FLAGS = flags.FlagValues()
PROMPTS = ("a photo of a {name}.", "{name}", "an image of the {name}.")


def text_evals(a, model, train, test, size, mesh, native=None) -> dict:
    """Zero-shot and retrieval of `a.text_model` against the encoder's test embeddings."""
    from mlcd_jax.data import sources, tokenizer
    from mlcd_jax.evaluate import features, zero_shot
    from mlcd_jax.interop.hf import mapping as hf
    from mlcd_jax.labels import store
    from mlcd_jax.runtime.errors import UserError
    tower = hf.load_text_model(a.text_model)
    tok = tokenizer.load(a.text_model, tower.cfg.context_length)
    x, y, rows = features.extract(model, test, image_size=size, mesh=mesh,
                                  desc="features (test)", native=native)
    if tower.cfg.embed_dim not in (None, x.shape[1]) or (
            tower.cfg.embed_dim is None and tower.cfg.width != x.shape[1]):
        raise UserError(f"--text_model {a.text_model} embeds texts in "
                         f"{tower.cfg.embed_dim or tower.cfg.width} dimensions, the encoder's "
                         f"images in {x.shape[1]}: not a text tower trained for this encoder")
    names = zero_shot.class_names(a.source, train, tuple(filter(None, a.class_names.split(","))))
    prompts = tuple(a.prompt or PROMPTS)
    captions = zero_shot.captions(sources.Subset(test, rows), y,
                                  templates=tuple(a.template or prompts), names=names)
    return zero_shot.text_evals(tower, tok, names, prompts, store.normalize(x), y, captions)


MODEL = flags.DEFINE_string("model", None, "A training workdir, our model dir, or a transformers "
                            "checkpoint dir.", flag_values=FLAGS)
flags.DEFINE_alias("checkpoint", "model", flag_values=FLAGS)
flags.DEFINE_alias("workdir", "model", flag_values=FLAGS)
STEP = flags.DEFINE_integer("step", None, "With a training workdir: which step.", flag_values=FLAGS)
SOURCE = flags.DEFINE_enum("source", None, list(LABELLED),
                           "The images (arrayrecord: converted from a folder's class "
                           "sub-folders, or with --regions, their region classes).",
                           flag_values=FLAGS)
flags.DEFINE_alias("dataset", "source", flag_values=FLAGS)  # its former name, kept
PATH = flags.DEFINE_string("path", "", "folder: the (train) images, one sub-folder per class; "
                           "tfds: the data_dir.", flag_values=FLAGS)
TEST_PATH = flags.DEFINE_string("test_path", "", "folder: the test images (same classes).",
                                flag_values=FLAGS)
TFDS_NAME = flags.DEFINE_string("tfds_name", "", "tfds: the dataset's name.", flag_values=FLAGS)
TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "The train split.", flag_values=FLAGS)
TEST_SPLIT = flags.DEFINE_string("test_split", "", "The dataset's test split (tfds, "
                                 "digits_canvas).", flag_values=FLAGS)
TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.3, "Without a test split or folder: this "
                                   "fraction of the images is held out.", flag_values=FLAGS)
IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Default: the model's.", flag_values=FLAGS)
SIZING = cli.sizing_flags(FLAGS)
PIXELS = flags.DEFINE_bool("pixels", True, "Also probe raw pixels, the baseline.",
                           flag_values=FLAGS)
TEXT_MODEL = flags.DEFINE_string("text_model", "", "A text tower (LiT's text_model dir: "
                                 "transformers CLIP text model + tokenizer.json) for zero-shot "
                                 "and retrieval.", flag_values=FLAGS)
PROMPT = flags.DEFINE_multi_string("prompt", None, "Zero-shot prompt with {name} (repeat; "
                                   "default: three CLIP-style ones).", flag_values=FLAGS)
TEMPLATE = flags.DEFINE_multi_string("template", None, "Retrieval caption with {name} (and "
                                     "{size}, {place} on digits_canvas; repeat; default: the "
                                     "prompts).", flag_values=FLAGS)
CLASS_NAMES = flags.DEFINE_string("class_names", "", "Comma-separated (default: the dataset's).",
                                  flag_values=FLAGS)
REGIONS = flags.DEFINE_bool("regions", False, "Also the region and dense probes (images with "
                            "boxes whose regions have classes).", flag_values=FLAGS)
ANNOTATIONS = flags.DEFINE_string("annotations", "", "folder with --regions: its images' boxes "
                                  "(what convert --regions takes: a COCO-style .json, a .jsonl "
                                  "keyed by path).", flag_values=FLAGS)
TEST_ANNOTATIONS = flags.DEFINE_string("test_annotations", "", "The --test_path folder's boxes "
                                       "(default: --annotations).", flag_values=FLAGS)
DENSE = flags.DEFINE_bool("dense", True, "With --regions: also the dense probe.", flag_values=FLAGS)
MAX_REGIONS = flags.DEFINE_integer("max_regions", 50_000, "With --regions: at most this many "
                                   "train regions (a seeded sample).", flag_values=FLAGS)
MAX_PATCHES = flags.DEFINE_integer("max_patches", 20_000, "With --regions: at most this many "
                                   "patches of each split for the dense probe (a seeded sample).",
                                   flag_values=FLAGS)
OUT = flags.DEFINE_string("out", "", "The JSON results (default: MODEL/eval.json for a training "
                          "workdir, else none).", flag_values=FLAGS)


def command(args) -> int | None:
    del args
    from mlcd_jax.runtime.errors import UserError
    a = FLAGS
    if a.source == "folder" and not a.path:
        raise UserError("--source folder needs --path (the image folder, one sub-folder per "
                        "class)")
    if not a.regions and (a.annotations or a.test_annotations):
        raise UserError("--annotations is for --regions (a folder's boxes for the region "
                        "probes)")
    if a.max_regions < 2 or a.max_patches < 2:
        raise UserError("--max_regions and --max_patches must be ≥ 2")
    import jax

    from mlcd_jax.evaluate import features, regions as region_probes, run as evaluation
    from mlcd_jax.interop import weights
    from mlcd_jax.runtime import distributed, mesh as mesh_lib
    distributed.initialize()  # a multi-process job (runtime/distributed.py) shares the work
    model, what = weights.load_encoder(a.model, a.step)
    train, test = evaluation.dataset_splits(a.source, path=a.path, test_path=a.test_path,
                                     tfds_name=a.tfds_name, train_split=a.train_split,
                                     test_split=a.test_split, test_fraction=a.test_fraction,
                                     labelled=not a.regions, annotations=a.annotations,
                                     test_annotations=a.test_annotations)
    native = weights.sizing(a.model, model, a.resolution, a.max_tokens, a.min_tokens,
                            a.image_size)
    size = weights.image_side(a.model, model, a.image_size, native)
    mesh = mesh_lib.make_mesh([("data", -1)])  # batches split over every device
    if a.regions:
        region_probes.class_names(train, test)  # no regions, no classes: said before work
    result = {}
    if evaluation.image_classes(train):
        result = evaluation.evaluate(model, train, test, image_size=size, mesh=mesh, native=native)
        if a.pixels:
            side = min(size, 32)
            result["raw_pixels"] = evaluation.probe(features.pixels(train, image_size=side),
                                             features.pixels(test, image_size=side))
    elif jax.process_index() == 0:
        print(f"{a.source}: the images have no classes; only the region probes run")
    if a.text_model:
        result["text"] = text_evals(a, model, train, test, size, mesh, native)
    if a.regions:
        from mlcd_jax.models import region
        layers = weights.load_region_layers(a.model, a.step)  # a run with region heads
        with_layers = model if layers is None else region.WithRegions(model, layers)
        result |= region_probes.evaluate(with_layers, train, test, image_size=size, mesh=mesh,
                                         max_regions=a.max_regions,
                                         max_patches=a.max_patches, dense=a.dense)
    result |= {"model": what, "source": a.source, "train": len(train), "test": len(test),
               "resolution": (native.describe() if native else
                              {"resolution": "square", "image_size": size})}
    if jax.process_index() != 0:  # every process computed the same result; one reports it
        return 0
    print(f"{a.source}: {len(train)} train / {len(test)} test images"
          + (f", {native} (raw pixels and region probes: {size}² crops)" if native
             else f", {size}² crops"))
    if "regions" in result:
        r = result["regions"]
        print(f"regions: {r['train']['probed']} train / {r['test']['probed']} test regions with "
              f"a class of {len(r['classes'])}" + (
                  f"; dense: {result['dense']['train']['probed']} train / "
                  f"{result['dense']['test']['probed']} test patches" if "dense" in result
                  else ""))
    print(f"{'':<32}{'linear probe':>13}{'kNN':>8}")
    rows = ((what, result), ("raw pixels", result.get("raw_pixels")),
            ("regions: pooled patch tokens", result.get("regions", {}).get("pooled_patches")),
            ("regions: region layer", result.get("regions", {}).get("region_layer")),
            ("dense: patch tokens", result.get("dense")))
    for name, r in rows:
        if r and "linear_probe" in r:
            knn = f"{r['knn']['accuracy']:>8.4f}" if "knn" in r else f"{'–':>8}"
            print(f"{name[:32]:<32}{r['linear_probe']['accuracy']:>13.4f}{knn}")
    if "text" in result:
        print("with " + a.text_model + ": " + ", ".join(f"{k} {v:.4f}"
                                                       for k, v in result["text"].items()))
    is_run = (pathlib.Path(a.model) / "checkpoints").is_dir()
    out = pathlib.Path(a.out) if a.out else pathlib.Path(a.model) / "eval.json" if is_run else None
    if out is None:  # never into a downloaded model's dir, nor the current directory unasked
        print("not written: --out FILE.json keeps these results as JSON")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    return cli.run(command, FLAGS, argv, required=("model", "source"), doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
