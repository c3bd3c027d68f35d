"""The MLCD trainer's config: every field with its documented default (ml_collections), and what
the fields mean for the model (`vit_config`) and the schedule (`total_steps`).

Every config file's `get_config(arg)` starts from `base_config()`, so every field exists and has a
documented default; `--config.a.b=value` on the command line overrides, and a misspelt field fails
at parse time (`flag_parsing.py`). What depends on the machine is checked before any compute
(`validation.py`); the paper's recipes are in `recipes.py`, LiT's config in `lit_config.py`.
"""

from __future__ import annotations

import math

import ml_collections

from mlcd_jax.data import transforms
from mlcd_jax.models import vit
from mlcd_jax.runtime.errors import UserError


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = (("data", -1),)                # (axis, size) pairs; -1 = the remaining devices

    c.model = ml_collections.ConfigDict()
    c.model.size = "B/16"                   # a name in mlcd_jax.models.vit.SIZES; "" = the
                                            # five fields below
    c.model.width = 0                       # 0 = the size's; with model.init_from all of these
    c.model.depth = 0                       # (and pos, act, rope_theta, ln_eps) come from the
    c.model.heads = 0                       # checkpoint it names
    c.model.mlp_dim = 0
    c.model.patch = 0
    c.model.rope_theta = 10000.0
    c.model.ln_eps = 1e-5
    c.model.pos = "rope"                    # "rope" (MLCD) or "learned" (CLIP)
    c.model.act = ""                        # "" = the default of `pos` (gelu / quick_gelu)
    c.model.embed_dim = 512                 # projection width fed to the head; 0 = none
    c.model.image_size = 0                  # 0 = data.image_size
    c.model.dtype = "bfloat16"              # compute dtype; parameters stay float32
    c.model.scan = False
    c.model.remat = False                   # recompute block activations in the backward pass
    c.model.remat_policy = "full"           # what remat keeps: "full" (nothing), "dots" (the
                                            # dense layers' outputs)
    c.model.attention = "auto"              # "auto" (cuDNN on GPU in bf16), "xla", "cudnn"
    c.model.attention_pad = 0               # pad tokens to a multiple (0: what attention needs)
    c.model.region_layers = 0               # RICE's Region Transformer layers after the blocks
                                            # (models/region.py): region heads need ≥ 1
    c.model.init_from = ""                  # continue from an encoder: a transformers MLCD /
                                            # CLIP vision dir, our model dir or a training
                                            # workdir; its architecture replaces the config's

    c.head = ml_collections.ConfigDict()
    c.head.loss = "mlcd"                    # "mlcd" (multi-label), "unicom" (single label), or
                                            # "multi_softmax" (OneVision-Encoder: a margin-
                                            # softmax per label column, averaged)
    c.head.num_classes = 1_000_000
    c.head.scale = 32.0
    c.head.margin = 0.3
    c.head.margin_type = "arcface"          # s·cos(θ + m), or "cosface": s·(cos θ − m)
    c.head.margin_grad = "straight_through" # ArcFace's gradient as for s·cos θ, as the authors'
                                            # Partial FC code; "exact" turns round past π − m
    c.head.sample_ratio = 0.1
    c.head.negatives = "uniform"            # each shard's draw: "uniform" (ceil(r·K_local) at
                                            # random), or "batch" (Partial FC v2: the batch's
                                            # positives always, the rest at random)
    c.head.center_update = "dense"          # "sparse": only the center rows drawn or positive
                                            # (and their AdamW moments) move (Partial FC v1)
    c.head.label_columns = 0                # multi_softmax: columns per sample and step, drawn
                                            # from its data.num_labels (0: all)
    c.head.negative_filter = 1.0            # a negative above this cosine counts as cosine 0
                                            # with no gradient (insightface's interclass
                                            # filtering, e.g. 0.75); ≥ 1: off
    c.head.lr_mult = 1.0                    # learning-rate multiplier of the class centers
    c.head.chunk = 0                        # classes scored at a time per shard; 0 = automatic
    c.head.matmul_dtype = ""                # negatives' matmul inputs: "" = as model.dtype (bf16
                                            # with float32 accumulation), or "float32"
    c.head.weight = 1.0                     # this (the image) head's weight in the total loss

    # Region heads (RICE, arXiv 2507.20025): by name, each a `region_head(...)` (a config file
    # adds them: configs/demo_regions.py); the loss is Σ weight · each head's. Empty: the image
    # head alone. They need model.region_layers ≥ 1 and data.regions_per_image ≥ 1.
    c.heads = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"             # one of mlcd_jax.data.sources.SOURCES
    c.data.path = ""                        # folder / ArrayRecord glob / tfds data_dir
    c.data.tfds_name = ""
    c.data.split = "train"
    c.data.labels = ""                      # label store dir (`python -m mlcd_jax.labels`); "" =
                                            # the source's own class as the single label
    c.data.missing_labels = "error"         # a record whose key the store lacks: "error" (names
                                            # them) or "skip" (left out, counted)
    c.data.workers = -1                     # grain worker processes: 0 = in the main process;
                                            # -1 = the cores on accelerators, 0 on CPU devices
    c.data.crop_scale = (0.08, 1.0)         # random-resized-crop area fraction
    c.data.flip = True                      # random horizontal flip (off where it changes the
                                            # class, e.g. digits)
    c.data.image_size = 224
    c.data.resolution = "square"            # "square": every image one image_size² crop;
                                            # "native" (NaFlex): each keeps its aspect ratio at
                                            # the largest patch-aligned size within max_tokens;
                                            # "squash": each whole image resized to
                                            # image_size², its aspect ratio lost
    c.data.max_tokens = 0                   # native: patches per image at most (the batch's
                                            # row length); 0 = (image_size / patch)², the
                                            # square size's
    c.data.min_tokens = 0                   # native: 0 = every image resized to fill
                                            # max_tokens; > 0 = images keep their own size where
                                            # it has min_tokens … max_tokens patches
    c.data.num_labels = 8                   # l
    c.data.regions_per_image = 0            # N region slots per image for the region heads:
                                            # subsampled, or repeated when fewer (RICE)
    c.data.num_examples = 0                 # examples per epoch: a real source's own size;
                                            # synthetic data (and --compile_only / plan) use this
    c.data.noise = 0.5                      # synthetic: noise std around each class template

    c.batch_size = 32_768                   # global
    c.grad_accum = 1                        # micro-batches per step (batch_size / grad_accum each)
    c.total_steps = 0                       # steps, or:
    c.epochs = 0.0                          # epochs over the data (one of the two)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2_000
    c.optim.end_lr_factor = 0.0             # cosine decays to lr × this
    c.optim.weight_decay = 0.2              # not on norms, biases, embeddings
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.clip_norm = 1.0                 # global-norm clipping; 0 = off

    c.log_every = 50
    c.checkpoint_every = 1_000
    c.keep_checkpoints = 3
    c.profile_steps = 0                     # > 0: a jax.profiler trace of this many steps (after
                                            # the first) into WORKDIR/profile

    # Periodic evaluation of the encoder (linear probe / kNN on frozen features), logged to
    # evals.jsonl and TensorBoard; the same evaluators as `python -m mlcd_jax.evaluate`.
    c.evals = ml_collections.ConfigDict()
    c.evals.every = 0                       # steps between evals (and after the last); 0 = off
    c.evals.dataset = "digits"              # a data source other than synthetic
    c.evals.path = ""
    c.evals.tfds_name = ""
    c.evals.train_split = "train"
    c.evals.test_split = ""                 # the dataset's own test split (tfds, digits_canvas)
    c.evals.test_path = ""                  # folder: the test images (else test_fraction held out)
    c.evals.test_fraction = 0.3
    c.evals.probes = ("knn", "linear_probe")
    return c


def region_head(**fields) -> ml_collections.ConfigDict:
    """A region head's config (`config.heads.NAME`), `fields` overriding the defaults: RICE's
    object head (a single-label margin softmax over region clusters). Its OCR head: loss="mlcd",
    regions="text", num_labels = the token ids kept per text, num_classes = the vocabulary."""
    h = ml_collections.ConfigDict()
    h.labels = ""                           # its region label store (`labels embed --regions`
                                            # then `assign`, or `labels ocr`)
    h.regions = "objects"                   # which regions it trains on: "objects" (no text),
                                            # "text" (OCR regions), "all"
    h.num_classes = 0                       # K (the store's: checked when training starts)
    h.num_labels = 1                        # l per region
    h.loss = "unicom"                       # as config.head.loss
    h.scale = 32.0
    h.margin = 0.3
    h.margin_type = "arcface"
    h.margin_grad = "straight_through"
    h.sample_ratio = 0.1                    # ρ (RICE: 0.1)
    h.negatives = "uniform"
    h.label_columns = 0
    h.negative_filter = 1.0
    h.chunk = 0
    h.matmul_dtype = ""
    h.weight = 1.0                          # its weight in the total loss
    h.lr_mult = 1.0                         # learning-rate multiplier of its centers
    h.missing_labels = "error"              # a region it trains on that its store lacks: "error"
                                            # (names them) or "skip" (counted, left out)
    for name, value in fields.items():
        if name not in h:
            raise UserError(f"region_head: no field {name!r}; the fields are {', '.join(h)}")
        h[name] = value
    return h


def total_steps(c: ml_collections.ConfigDict, num_examples: int | None = None) -> int:
    """`total_steps`, or `epochs` over `num_examples` (the data's size; default: the config's
    data.num_examples, which planning uses before any data is opened)."""
    if c.total_steps:
        return int(c.total_steps)
    n = num_examples if num_examples is not None else c.data.num_examples
    if not n:
        raise UserError("config.epochs: the epoch length is unknown: set config.data.num_examples "
                        "(the synthetic source has no size of its own) or use config.total_steps")
    return math.ceil(c.epochs * n / c.batch_size)


RESOLUTIONS = ("square", "native", "squash")


def native(c: ml_collections.ConfigDict, patch: int) -> transforms.Native | None:
    """The native-resolution sizing of config `c`'s data for a model of `patch` (None: square
    crops; a workdir's config.json from before these fields existed is square). "squash" is the
    same patch path with every image on the square grid of data.image_size."""
    d = c.data
    resolution = d.get("resolution", "square")
    if resolution == "squash":
        return transforms.Native(patch, (d.image_size // patch) ** 2, keep_aspect=False)
    if resolution != "native":
        return None
    budget = d.get("max_tokens", 0) or (d.image_size // patch) ** 2
    return transforms.Native(patch, budget, d.get("min_tokens", 0))


SHAPE_FIELDS = ("width", "depth", "heads", "mlp_dim", "patch")  # model.size, field by field


def vit_config(c: ml_collections.ConfigDict) -> vit.ViTConfig:
    m = c.model
    overrides = dict(pos=m.pos, embed_dim=m.embed_dim or None, dtype=m.dtype, scan=m.scan,
                     remat=m.remat, remat_policy=m.remat_policy, attention=m.attention,
                     attention_pad=m.attention_pad, image_size=m.image_size or c.data.image_size,
                     # a workdir's config.json from before these fields existed has the defaults
                     rope_theta=m.get("rope_theta", 10000.0), ln_eps=m.get("ln_eps", 1e-5))
    overrides |= {f: m[f] for f in SHAPE_FIELDS if m.get(f, 0)}
    if m.act:
        overrides["act"] = m.act
    elif m.pos == "learned":
        overrides["act"] = "quick_gelu"
    if not m.size:
        unset = [f"model.{f}" for f in SHAPE_FIELDS if not m.get(f, 0)]
        if unset:
            raise UserError(f"config.model.size is '': set {', '.join(unset)} (or a size name: "
                            f"{', '.join(vit.SIZES)})")
        return vit.ViTConfig(**overrides)
    return vit.vit_config(m.size, **overrides)


def lit_config() -> ml_collections.ConfigDict:
    """Defaults of a LiT run (`python -m mlcd_jax.lit`): a text tower trained against a locked
    image encoder; every `configs/lit_*.py` starts here."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = (("data", -1),)
    c.image = ml_collections.ConfigDict()
    c.image.model = ""                      # a training workdir, our model dir or transformers dir
    c.image.image_size = 224
    c.image.resolution = ""                 # "" = as the encoder was trained or exported;
                                            # "square" (image_size² crops), "squash"
                                            # (whole images to image_size²) or "native"
    c.image.max_tokens = 0                  # native: patches per image at most (0: the
                                            # encoder's budget, else (image_size / patch)²)
    c.image.min_tokens = 0                  # native: see the trainer's config.data.min_tokens
    c.image.batch_size = 256                # images embedded at a time (once: the tower is locked)
    c.text = ml_collections.ConfigDict()
    c.text.size = "B"                       # mlcd_jax.models.text.SIZES
    c.text.context_length = 77
    c.text.dtype = "float32"
    c.text.tokenizer = ""                   # a dir with tokenizer.json or vocab.json + merges.txt;
                                            # "" = a BPE trained on the captions, saved in WORKDIR
    c.text.vocab_size = 8192                # of that trained BPE
    c.text.tokenizer_images = 1_000_000     # whose captions train it (a seeded sample of the
                                            # train split when it has more)
    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "clip"                    # "clip" (softmax) or "siglip" (sigmoid)
    c.loss.init_scale = 10.0                # exp(t) at the start (the learned temperature)
    c.loss.init_bias = -10.0                # SigLIP's bias at the start
    c.loss.chunk = 0                        # text columns scored at a time; 0 = all
    # Image–text pairs, each image captioned by `templates` with its class {name}, what the
    # dataset says of it (the demo's canvases: {size}, {place}) and its own {caption}s (a folder's
    # IMAGE.txt, convert's ArrayRecord files, a tfds "caption(s)" feature); its held-out split is
    # the zero-shot and retrieval test set. Without classes (e.g. "arrayrecord" from img2dataset
    # shards, templates ("{caption}",)): retrieval only.
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "digits_canvas"        # digits_canvas, digits, folder, arrayrecord, tfds
    c.data.path = ""
    c.data.test_path = ""
    c.data.tfds_name = ""
    c.data.train_split = "train"
    c.data.test_split = ""
    c.data.test_fraction = 0.3
    c.data.class_names = ()                 # () = the dataset's own (folder names, digit names)
    c.data.templates = ("a photo of a {name}.", "{name}", "an image of the {name}.")
    c.batch_size = 256
    c.total_steps = 1000
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.end_lr_factor = 0.0
    c.optim.weight_decay = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.clip_norm = 1.0
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.profile_steps = 0                     # > 0: a jax.profiler trace of this many steps
    c.evals = ml_collections.ConfigDict()
    c.evals.every = 0                       # steps between zero-shot / retrieval evals (and
                                            # after the last); 0 = off
    c.evals.prompts = ("a photo of a {name}.", "{name}", "an image of the {name}.")  # zero-shot:
                                            # each class the average of its prompts
    return c
