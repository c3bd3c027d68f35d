"""Every config's fields, types, defaults and allowed values, declared once.

A section is a frozen dataclass: a field's default is the config's default (and its type the
field's type), its metadata what it allows. The trainer's config (`base_config`) and LiT's
(`lit_config`) are ml_collections ConfigDicts made from these sections, so `--config.a.b=value`
overrides and a misspelt field fails when the flags are parsed. `check(c)` holds every field of a
config against its section: one line naming `config.SECTION.FIELD`, what it allows and what it
got. `upgrade(c)` brings a config of an older version (a workdir's config.json, a config file that
still uses a renamed field) to this one, in one place. The sharded head is configured by a `Head`
itself; the model's fields become a ViTConfig in models/vit.py (`vit.from_config`).

The allowed values are named here once; the modules that implement them import them from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import ml_collections

from mlcd_jax.runtime.errors import UserError

# -- allowed values -------------------------------------------------------------------------------
# multi-label (MLCD); single-label baseline (UNICOM / Partial FC); OneVision-Encoder's form (a
# margin-softmax per label column, averaged)
LOSSES = ("mlcd", "unicom", "multi_softmax")
MARGIN_TYPES = ("arcface", "cosface")            # s·cos(θ + m), or s·(cos θ − m)
MARGIN_GRADS = ("straight_through", "exact")     # ArcFace's gradient as for s·cos θ, or exact
# Each shard's draw: ceil(r·K_local) classes at random, or Partial FC v2's rule (the batch's
# positives always, the rest at random)
NEGATIVES = ("uniform", "batch")
CENTER_UPDATES = ("dense", "sparse")             # every center row each step, or the rows used
REGIONS = ("objects", "text", "all")             # the regions a head trains on: no text, a text
MISSING = ("error", "skip")                      # a record (region) its store lacks
SOURCES = ("synthetic", "digits", "digits_canvas", "digits_regions", "digits_strips", "folder",
           "arrayrecord", "tfds")                # data/sources.py
# sources whose images have classes (ArrayRecord: converted from a folder's class sub-folders)
LABELLED = ("digits", "digits_canvas", "digits_regions", "digits_strips", "folder", "arrayrecord",
            "tfds")
WITH_SPLITS = ("digits_canvas", "digits_regions", "digits_strips", "tfds")  # `split` selects
RESOLUTIONS = ("square", "native", "squash")
PROBES = ("linear_probe", "knn")                 # the evaluators of frozen features
CONTRASTIVE = ("clip", "siglip")                 # LiT's loss: softmax or sigmoid


def field(default, *, choices: tuple | None = None,
          check: tuple[Callable[[Any], bool], str] | None = None, config: bool = True):
    """A section's field: its default, the values it allows (`choices`, or `check`: a predicate
    and what it requires), and whether it is a config field at all (`config=False`: set by the
    code, e.g. a region head's name)."""
    return dataclasses.field(default=default, metadata={"choices": choices, "check": check,
                                                        "config": config})


def at_least(low, what: str = ""):
    return (lambda v: v >= low, f"must be ≥ {low}{what}")


class Section:
    """The methods every section shares: its fields as a ConfigDict, and one made from a config's
    section (types as declared, every field checked)."""

    @classmethod
    def config_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]

    @classmethod
    def section(cls, **overrides) -> ml_collections.ConfigDict:
        """A ConfigDict of the section's fields at their defaults, `overrides` applied."""
        values = {f.name: f.default for f in cls.config_fields()}
        unknown = set(overrides) - set(values)
        if unknown:
            raise UserError(f"{cls.__name__}: no field {sorted(unknown)[0]!r}; the fields are "
                            f"{', '.join(values)}")
        return ml_collections.ConfigDict(values | overrides)

    @classmethod
    def of(cls, section, where: str, **extra):
        """The section `section` (a ConfigDict of a config, `where` its path, e.g.
        "config.head") as this dataclass, every field checked; `extra`: fields set by the code."""
        values = {}
        for f in cls.config_fields():
            if f.name not in section:
                raise UserError(f"{where}.{f.name}: missing (a config made by another version? "
                                "`schema.upgrade` adds it)")
            values[f.name] = _as_type(section[f.name], type(f.default))
        try:
            return cls(**values, **extra)
        except UserError as e:
            raise UserError(f"{where}.{e}") from None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, choices, check = getattr(self, f.name), f.metadata.get("choices"), \
                f.metadata.get("check")
            if choices is not None and value not in choices:
                raise UserError(f"{f.name}: must be one of {choices}, got {value!r}")
            if check is not None and not check[0](value):
                raise UserError(f"{f.name}: {check[1]}, got {value!r}")


def _as_type(value, kind):
    """A config value as its field's declared type (ml_collections keeps an int given to a float
    field as an int; a tuple may arrive as a list from JSON)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


# -- the trainer ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run(Section):
    """The run's own fields, at the top of a config (the trainer's and LiT's)."""
    seed: int = 0
    mesh: tuple = (("data", -1),)           # (axis, size) pairs; -1 = the remaining devices
    batch_size: int = field(32_768, check=at_least(1))  # global
    grad_accum: int = field(1, check=at_least(1))       # micro-batches per step (batch_size /
                                                        # grad_accum each)
    total_steps: int = field(0, check=at_least(0))      # steps, or:
    epochs: float = field(0.0, check=at_least(0))       # epochs over the data (one of the two)
    log_every: int = field(50, check=at_least(1))
    checkpoint_every: int = field(1_000, check=at_least(1))
    keep_checkpoints: int = field(3, check=at_least(1))
    profile_steps: int = field(0, check=at_least(0, " (0 = no profile)"))  # > 0: a jax.profiler
                                            # trace of this many steps (after the first) into
                                            # WORKDIR/profile


@dataclasses.dataclass(frozen=True)
class Model(Section):
    size: str = "B/16"                      # a name in mlcd_jax.models.vit.SIZES; "" = the five
                                            # fields below
    width: int = field(0, check=at_least(0))  # 0 = the size's; with model.init_from all of
    depth: int = field(0, check=at_least(0))  # these (and pos, act, rope_theta, ln_eps) come
    heads: int = field(0, check=at_least(0))  # from the checkpoint it names
    mlp_dim: int = field(0, check=at_least(0))
    patch: int = field(0, check=at_least(0))
    rope_theta: float = 10000.0
    ln_eps: float = 1e-5
    pos: str = field("rope", choices=("rope", "learned"))  # MLCD's RoPE, or CLIP's learned table
    act: str = ""                           # "" = the default of `pos` (gelu / quick_gelu)
    embed_dim: int = field(512, check=at_least(0))  # projection width fed to the head; 0 = none
    image_size: int = field(0, check=at_least(0))   # 0 = data.image_size
    dtype: str = "bfloat16"                 # compute dtype; parameters stay float32
    scan: bool = False
    remat: bool = False                     # recompute block activations in the backward pass
    remat_policy: str = "full"              # what remat keeps: "full" (nothing), "dots" (the
                                            # dense layers' outputs)
    attention: str = "auto"                 # "auto" (cuDNN on GPU in bf16), "xla", "cudnn"
    attention_pad: int = field(0, check=at_least(0))  # pad tokens to a multiple (0: what
                                            # attention needs)
    region_layers: int = field(0, check=at_least(0))  # RICE's Region Transformer layers after
                                            # the blocks (models/region.py): region heads need ≥ 1
    init_from: str = ""                     # continue from an encoder: a transformers MLCD / CLIP
                                            # vision dir, our model dir or a training workdir;
                                            # its architecture replaces the config's


@dataclasses.dataclass(frozen=True)
class Head(Section):
    """How a head scores a batch against its class centers (`config.head`; the loss in
    DESIGN.md), and the head's share of the optimizer and the total loss. The sharded head
    (training/sharded_head.py) is configured by this dataclass itself."""
    loss: str = field("mlcd", choices=LOSSES)
    num_classes: int = field(1_000_000, check=at_least(1))  # K
    scale: float = 32.0                     # s
    margin: float = 0.3                     # m
    margin_type: str = field("arcface", choices=MARGIN_TYPES)
    margin_grad: str = field("straight_through", choices=MARGIN_GRADS)  # the authors' Partial FC
                                            # code applies the margin under no_grad; "exact"
                                            # turns round past θ = π − m
    sample_ratio: float = field(0.1, check=(lambda r: 0.0 < r <= 1.0, "must be in (0, 1]"))  # r:
                                            # each shard draws ceil(r · K_local) negatives; 1 =
                                            # all, exact
    negatives: str = field("uniform", choices=NEGATIVES)
    center_update: str = field("dense", choices=CENTER_UPDATES)  # "sparse": only the center
                                            # rows drawn or positive (and their AdamW moments)
                                            # move (Partial FC v1)
    label_columns: int = field(0, check=at_least(0, " (0 = every label column)"))  #
                                            # multi_softmax: columns per sample and step, drawn
                                            # from its l
    negative_filter: float = field(1.0, check=(lambda f: f > -1.0, "must be a cosine above -1 "
                                                                    "(≥ 1: off)"))  # a negative
                                            # above this cosine counts as cosine 0 with no
                                            # gradient (insightface's interclass filtering,
                                            # e.g. 0.75); ≥ 1: off
    lr_mult: float = field(1.0, check=(lambda m: m > 0, "must be > 0"))  # the centers'
                                            # learning-rate multiplier
    chunk: int = field(0, check=at_least(0, " (0 = automatic)"))  # classes scored at a time per
                                            # shard
    matmul_dtype: str = field("", choices=("", "float32", "bfloat16"))  # the negatives' matmul
                                            # inputs: "" = the model's compute dtype (float32
                                            # where the head runs alone), accumulation float32
    weight: float = field(1.0, check=at_least(0))  # this head's weight in the total loss
    # A sample whose labels are all -1 counts for nothing: a region head's padding, a region its
    # store has no label for. The image head's mean is over every sample, as it always was.
    skip_unlabelled: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class RegionHead(Head):
    """A region head (RICE, arXiv 2507.20025: `config.heads.NAME`, made by `region_head(...)`):
    its own centers scored against the region embeddings. Defaults: RICE's object head, a
    single-label margin softmax over region clusters; its OCR head is loss="mlcd",
    regions="text", num_labels = the token ids kept per text, num_classes = the vocabulary."""
    loss: str = field("unicom", choices=LOSSES)
    num_classes: int = field(0, check=(lambda k: k >= 1, "must be ≥ 1 (K of its label store)"))
    labels: str = ""                        # its region label store (`labels embed --regions`
                                            # then `assign`, or `labels ocr`)
    regions: str = field("objects", choices=REGIONS)  # which regions it trains on: "objects"
                                            # (no text), "text" (OCR regions), "all"
    num_labels: int = field(1, check=at_least(1))  # l per region
    missing_labels: str = field("error", choices=MISSING)  # a region it trains on that its store
                                            # lacks: "error" (names them) or "skip" (counted)
    name: str = field("", config=False)     # its name in config.heads
    skip_unlabelled: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Data(Section):
    source: str = field("synthetic", choices=SOURCES)
    path: str = ""                          # folder / ArrayRecord glob / tfds data_dir
    tfds_name: str = ""
    split: str = "train"
    labels: str = ""                        # label store dir (`python -m mlcd_jax.labels`); "" =
                                            # the source's own class as the single label
    missing_labels: str = field("error", choices=MISSING)  # a record whose key the store lacks:
                                            # "error" (names them) or "skip" (left out, counted)
    workers: int = field(-1, check=at_least(-1, " (-1 = automatic, 0 = none)"))  # grain worker
                                            # processes: 0 = in the main process; -1 = the cores
                                            # on accelerators, 0 on CPU devices
    crop_scale: tuple = (0.08, 1.0)         # random-resized-crop area fraction
    flip: bool = True                       # random horizontal flip (off where it changes the
                                            # class, e.g. digits)
    image_size: int = field(224, check=at_least(1))
    resolution: str = field("square", choices=RESOLUTIONS)  # "square": every image one
                                            # image_size² crop; "native" (NaFlex): each keeps
                                            # its aspect ratio at the largest patch-aligned size
                                            # within max_tokens; "squash": each whole image
                                            # resized to image_size², its aspect ratio lost
    max_tokens: int = field(0, check=at_least(0))  # native: patches per image at most (the
                                            # batch's row length); 0 = (image_size / patch)²
    min_tokens: int = field(0, check=at_least(0))  # native: 0 = every image resized to fill
                                            # max_tokens; > 0 = images keep their own size where
                                            # it has min_tokens … max_tokens patches
    num_labels: int = field(8, check=at_least(1))  # l
    regions_per_image: int = field(0, check=at_least(0))  # N region slots per image for the
                                            # region heads: subsampled, or repeated when fewer
    num_examples: int = field(0, check=at_least(0))  # examples per epoch: a real source's own
                                            # size; synthetic data (and --compile_only / plan)
                                            # use this
    noise: float = 0.5                      # synthetic: noise std around each class template


@dataclasses.dataclass(frozen=True)
class Optim(Section):
    """The one optimizer of both trainers (training/optim.py): AdamW, warm-up then cosine."""
    lr: float = field(5e-4, check=(lambda lr: lr > 0, "must be > 0"))
    warmup_steps: int = field(2_000, check=at_least(0))
    end_lr_factor: float = field(0.0, check=at_least(0))  # cosine decays to lr × this
    weight_decay: float = field(0.2, check=at_least(0))   # not on norms, biases, embeddings
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    clip_norm: float = field(1.0, check=at_least(0, " (0 = off)"))  # global-norm clipping


@dataclasses.dataclass(frozen=True)
class EvalData(Section):
    """Labelled images split into train and test for frozen-feature evaluation: the trainer's
    `evals`, LiT's `data`; `python -m mlcd_jax.evaluate` takes the same as flags. The test
    images are never the train images: the source's own test split (tfds, digits_canvas), a test
    folder (or ArrayRecord files), else a seeded held-out fraction."""
    source: str = ""                        # one of LABELLED (LiT also: arrayrecord)
    path: str = ""                          # folder: the train images, one sub-folder per class
    test_path: str = ""                     # folder: the test images (else test_fraction held out)
    tfds_name: str = ""
    train_split: str = "train"
    test_split: str = ""                    # the source's own test split (tfds, digits_canvas)
    test_fraction: float = field(0.3, check=(lambda f: 0 < f < 1, "must be in (0, 1)"))


@dataclasses.dataclass(frozen=True)
class Evals(EvalData):
    """Periodic evaluation of the encoder while it trains (linear probe / kNN on frozen features),
    logged to evals.jsonl and TensorBoard: the evaluators of `python -m mlcd_jax.evaluate`."""
    every: int = field(0, check=at_least(0, " (0 = no evals)"))  # steps between evals (and after
                                            # the last); 0 = off
    probes: tuple = field(("knn", "linear_probe"), check=(
        lambda p: bool(p) and set(p) <= set(PROBES), f"must be a non-empty subset of {PROBES}"))


TRAINER = {"": Run, "model": Model, "head": Head, "data": Data, "optim": Optim, "evals": Evals}


def base_config() -> ml_collections.ConfigDict:
    """The trainer's config at its defaults: every config file's `get_config(arg)` starts here.
    Region heads (RICE) go under `heads`, by name, each a `region_head(...)`; the loss is
    Σ weight · each head's. They need model.region_layers ≥ 1 and data.regions_per_image ≥ 1."""
    c = Run.section()
    for name, section in TRAINER.items():
        if name:
            c[name] = section.section()
    c.heads = ml_collections.ConfigDict()
    return c


def region_head(**fields) -> ml_collections.ConfigDict:
    """A region head's config (`config.heads.NAME`), `fields` overriding the defaults."""
    return RegionHead.section(**fields)


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


# -- LiT ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LitImage(Section):
    model: str = ""                         # a training workdir, our model dir or transformers dir
    image_size: int = field(0, check=at_least(0))  # 0 = the encoder's own
    resolution: str = field("", choices=("", *RESOLUTIONS))  # "" = as the encoder was trained or
                                            # exported; "square" (image_size² crops), "squash"
                                            # (whole images to image_size²) or "native"
    max_tokens: int = field(0, check=at_least(0))  # native: patches per image at most (0: the
                                            # encoder's budget, else (image_size / patch)²)
    min_tokens: int = field(0, check=at_least(0))  # native: see the trainer's data.min_tokens
    batch_size: int = field(256, check=at_least(1))  # images embedded at a time (once: the tower
                                            # is locked)


@dataclasses.dataclass(frozen=True)
class LitText(Section):
    size: str = "B"                         # mlcd_jax.models.text.SIZES
    context_length: int = field(77, check=at_least(2))
    dtype: str = "float32"
    tokenizer: str = ""                     # a dir with tokenizer.json or vocab.json + merges.txt;
                                            # "" = a BPE trained on the captions, saved in WORKDIR
    vocab_size: int = field(8192, check=at_least(1))  # of that trained BPE
    tokenizer_images: int = field(1_000_000, check=at_least(1))  # whose captions train it (a
                                            # seeded sample of the train split when it has more)


@dataclasses.dataclass(frozen=True)
class LitLoss(Section):
    kind: str = field("clip", choices=CONTRASTIVE)  # "clip" (softmax) or "siglip" (sigmoid)
    init_scale: float = 10.0                # exp(t) at the start (the learned temperature)
    init_bias: float = -10.0                # SigLIP's bias at the start
    chunk: int = field(0, check=at_least(0))  # text columns scored at a time; 0 = all


@dataclasses.dataclass(frozen=True)
class LitData(EvalData):
    """Image–text pairs, each image captioned by `templates` with its class {name}, what the
    source says of it (the demo's canvases: {size}, {place}) and its own {caption}s (a folder's
    IMAGE.txt, convert's ArrayRecord files, a tfds "caption(s)" feature); its held-out split is
    the zero-shot and retrieval test set. Without classes (e.g. "arrayrecord" from img2dataset
    shards, templates ("{caption}",)): retrieval only."""
    class_names: tuple = ()                 # () = the source's own (folder names, digit names)
    templates: tuple = ("a photo of a {name}.", "{name}", "an image of the {name}.")


@dataclasses.dataclass(frozen=True)
class LitEvals(Section):
    every: int = field(0, check=at_least(0, " (0 = no evals)"))  # steps between zero-shot /
                                            # retrieval evals (and after the last); 0 = off
    prompts: tuple = ("a photo of a {name}.", "{name}", "an image of the {name}.")  # zero-shot:
                                            # each class the average of its prompts


LIT = {"": Run, "image": LitImage, "text": LitText, "loss": LitLoss, "data": LitData,
       "optim": Optim, "evals": LitEvals}
# LiT's own defaults where they differ from the trainer's
LIT_DEFAULTS = {"": {"batch_size": 256, "total_steps": 1000, "checkpoint_every": 500},
                "optim": {"lr": 1e-3, "warmup_steps": 100, "weight_decay": 1e-4}}


def lit_config() -> ml_collections.ConfigDict:
    """Defaults of a LiT run (`python -m mlcd_jax.lit`): a text tower trained against a locked
    image encoder; every LiT config file starts here."""
    c = Run.section(**LIT_DEFAULTS[""])
    for name, section in LIT.items():
        if name:
            c[name] = section.section(**LIT_DEFAULTS.get(name, {}))
    return c


# -- one check, one upgrade -----------------------------------------------------------------------

def check(c: ml_collections.ConfigDict, schema: dict = TRAINER) -> None:
    """Every field of config `c` against its section (`schema`: TRAINER or LIT); region heads
    too. A mistake raises UserError naming config.SECTION.FIELD."""
    for name, section in schema.items():
        section.of(c[name] if name else c, f"config.{name}" if name else "config")
    for name, h in c.heads.items() if "heads" in c else ():
        RegionHead.of(h, f"config.heads.{name}", name=name)


def head(c: ml_collections.ConfigDict) -> Head:
    """The image head of config `c`, checked; its matmuls in the model's compute dtype unless
    head.matmul_dtype says otherwise."""
    h = Head.of(c.head, "config.head")
    return dataclasses.replace(h, matmul_dtype=h.matmul_dtype or _matmul_dtype(c))


def region_heads(c: ml_collections.ConfigDict) -> tuple[RegionHead, ...]:
    """The region heads of `config.heads`, each checked (a mistake names config.heads.NAME.FIELD),
    their matmuls as the image head's."""
    return tuple(dataclasses.replace(h, matmul_dtype=h.matmul_dtype or _matmul_dtype(c))
                 for h in (RegionHead.of(s, f"config.heads.{name}", name=name)
                           for name, s in c.get("heads", {}).items()))


def _matmul_dtype(c) -> str:
    return "float32" if c.model.dtype == "float32" else "bfloat16"


# Fields renamed: (section, old name, new name). A config file, a command-line flag or a
# workdir's config.json that uses the old name still works.
RENAMED = (("evals", "dataset", "source"), ("data", "dataset", "source"))


def upgrade(c: ml_collections.ConfigDict, schema: dict = TRAINER) -> ml_collections.ConfigDict:
    """Config `c` as this version writes it: renamed fields under their new names, fields added
    since it was written at their defaults (a workdir's config.json from before them meant the
    defaults), tuples as tuples (JSON reads them as lists). Every reader of a config calls this
    once, so no code asks `c.get(field, default)`."""
    d = c.to_dict()
    for section, old, new in RENAMED:
        part = d.get(section)
        if part is not None and old in part:
            part[new] = part.pop(old)
    fresh = (lit_config() if schema is LIT else base_config()).to_dict()

    def complete(part: dict, kind: type[Section], defaults: dict) -> None:
        for f in kind.config_fields():
            part.setdefault(f.name, defaults[f.name])
            if type(f.default) is tuple:
                part[f.name] = _as_type(part[f.name], tuple)

    for name, section in schema.items():
        complete(d.setdefault(name, {}) if name else d, section,
                 fresh[name] if name else fresh)
    for h in d.get("heads", {}).values():
        complete(h, RegionHead, {f.name: f.default for f in RegionHead.config_fields()})
    return ml_collections.ConfigDict(d)
