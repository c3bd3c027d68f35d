"""Config defaults, validation and derived quantities (ml_collections).

Every config file's `get_config(arg)` starts from `base_config()`, so every field exists and has a
documented default; `--config.a.b=value` on the command line overrides, and a misspelt field fails
at parse time. `validate` checks what depends on the machine (mesh, batch divisibility) before any
compute.
"""

from __future__ import annotations

import math
import os
import re

import ml_collections

from mlcd_jax import losses, mesh as mesh_lib
from mlcd_jax.data import sources
from mlcd_jax.models import vit

LOSSES = ("mlcd", "unicom")             # mlcd_jax.head: multi-label, single-label baseline
PROBES = ("linear_probe", "knn")        # mlcd_jax.evaluate.probes


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
    c.model.init_from = ""                  # continue from an encoder: a transformers MLCD /
                                            # CLIP vision dir, our model dir or a training
                                            # workdir; its architecture replaces the config's

    c.head = ml_collections.ConfigDict()
    c.head.loss = "mlcd"                    # "mlcd" (multi-label) or "unicom" (single label)
    c.head.num_classes = 1_000_000
    c.head.scale = 32.0
    c.head.margin = 0.3
    c.head.margin_type = "arcface"          # s·cos(θ + m), or "cosface": s·(cos θ − m)
    c.head.margin_grad = "straight_through" # ArcFace's gradient as for s·cos θ, as the authors'
                                            # Partial FC code; "exact" turns round past π − m
    c.head.sample_ratio = 0.1
    c.head.lr_mult = 1.0                    # learning-rate multiplier of the class centers
    c.head.chunk = 0                        # classes scored at a time per shard; 0 = automatic
    c.head.matmul_dtype = ""                # negatives' matmul inputs: "" = as model.dtype (bf16
                                            # with float32 accumulation), or "float32"

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"             # one of mlcd_jax.data.sources.SOURCES
    c.data.path = ""                        # folder / ArrayRecord glob / tfds data_dir
    c.data.tfds_name = ""
    c.data.split = "train"
    c.data.labels = ""                      # label store dir (`python -m mlcd_jax.labels`); "" =
                                            # the source's own class as the single label
    c.data.workers = -1                     # grain worker processes: 0 = in the main process;
                                            # -1 = the cores on accelerators, 0 on CPU devices
    c.data.crop_scale = (0.08, 1.0)         # random-resized-crop area fraction
    c.data.flip = True                      # random horizontal flip (off where it changes the
                                            # class, e.g. digits)
    c.data.image_size = 224
    c.data.num_labels = 8                   # l
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


def lit_config() -> ml_collections.ConfigDict:
    """Defaults of a LiT run (`python -m mlcd_jax.lit`): a text tower trained against a locked
    image encoder; every `configs/lit_*.py` starts here."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = (("data", -1),)
    c.image = ml_collections.ConfigDict()
    c.image.model = ""                      # a training workdir, our model dir or transformers dir
    c.image.image_size = 224
    c.image.batch_size = 256                # images embedded at a time (once: the tower is locked)
    c.text = ml_collections.ConfigDict()
    c.text.size = "B"                       # mlcd_jax.models.text.SIZES
    c.text.context_length = 77
    c.text.dtype = "float32"
    c.text.tokenizer = ""                   # a dir with tokenizer.json or vocab.json + merges.txt;
                                            # "" = a BPE trained on the captions, saved in WORKDIR
    c.text.vocab_size = 8192                # of that trained BPE
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


def total_steps(c: ml_collections.ConfigDict, num_examples: int | None = None) -> int:
    """`total_steps`, or `epochs` over `num_examples` (the data's size; default: the config's
    data.num_examples, which planning uses before any data is opened)."""
    if c.total_steps:
        return int(c.total_steps)
    n = num_examples if num_examples is not None else c.data.num_examples
    if not n:
        raise ValueError("config.epochs: the epoch length is unknown: set config.data.num_examples "
                         "(the synthetic source has no size of its own) or use config.total_steps")
    return math.ceil(c.epochs * n / c.batch_size)


def parse_flags(argv):
    """absl flag parsing for the trainer and the planner in which a config mistake (a misspelt
    field, a missing config file, a value of the wrong type, an unknown config argument) is one
    line naming it, and exit 2, instead of ml_collections' chained tracebacks."""

    from absl import flags
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                _exit(f"--config={path}: no such file (configs are in configs/, e.g. "
                      "--config=configs/test_tiny.py)")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a config file's own error arrives with its traceback as text
        lines = [l for l in str(e).splitlines() if l.strip()]
        _exit(re.sub(r"^\w+(Error|Exception): ", "", lines[-1]) if "Traceback" in str(e)
              else " ".join(lines))
    except (AttributeError, KeyError) as e:  # a field that does not exist
        text = repr(e.args)
        name = re.search(r"'+(\w+)\\*'", text)
        hint = re.search(r'Did you mean \\*"(\w+)\\*"', text)
        arg = next((a.split("=")[0] for a in argv if name and a.startswith("--config.")
                    and a.split("=")[0].endswith("." + name.group(1))), "--config")
        _exit(f"{arg}: config has no field {name.group(1) if name else text!r}"
              f"{f'; did you mean {hint.group(1)!r}?' if hint else ''} (every field and its "
              "default: mlcd_jax/config.py:base_config)")
    except (OSError, ValueError, TypeError) as e:
        _exit(" ".join(str(e).split()))


def _exit(message: str):
    import sys
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_arg(arg, allowed: tuple, config_file: str) -> None:
    """A config file's `get_config(arg)` refuses an argument it does not know (a typo such as
    `:mlcdd` must not train something else)."""
    if arg not in allowed:
        shown = ", ".join(f":{a}" for a in allowed if a) or "none"
        raise ValueError(f"--config={config_file}:{arg}: unknown config argument; allowed: {shown}")


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
            raise ValueError(f"config.model.size is '': set {', '.join(unset)} (or a size name: "
                             f"{', '.join(vit.SIZES)})")
        return vit.ViTConfig(**overrides)
    return vit.vit_config(m.size, **overrides)


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise ValueError naming the field and the fix, before anything is compiled."""
    def fail(field, message):
        raise ValueError(f"config.{field}: {message}")

    if bool(c.total_steps) == bool(c.epochs):
        fail("total_steps", "set exactly one of config.total_steps and config.epochs "
             f"(got total_steps={c.total_steps}, epochs={c.epochs})")
    if c.head.loss not in LOSSES:
        fail("head.loss", f"must be one of {LOSSES}, got {c.head.loss!r}")
    if c.head.margin_type not in losses.MARGIN_TYPES:
        fail("head.margin_type", f"must be one of {losses.MARGIN_TYPES}, got "
             f"{c.head.margin_type!r}")
    if c.head.margin_grad not in losses.MARGIN_GRADS:
        fail("head.margin_grad", f"must be one of {losses.MARGIN_GRADS}, got "
             f"{c.head.margin_grad!r}")
    if c.data.source not in sources.SOURCES:
        fail("data.source", f"must be one of {sources.SOURCES}, got {c.data.source!r}")
    if not 0 < c.head.sample_ratio <= 1:
        fail("head.sample_ratio", f"must be in (0, 1], got {c.head.sample_ratio}")
    if c.head.matmul_dtype not in ("", "float32", "bfloat16"):
        fail("head.matmul_dtype", f"must be '', 'float32' or 'bfloat16', got "
             f"{c.head.matmul_dtype!r}")
    if c.head.chunk < 0:
        fail("head.chunk", f"must be ≥ 0 (0 = automatic), got {c.head.chunk}")
    if c.data.workers < -1:
        fail("data.workers", f"must be ≥ -1 (-1 = automatic, 0 = none), got {c.data.workers}")
    if c.data.num_labels < 1:
        fail("data.num_labels", f"must be ≥ 1, got {c.data.num_labels}")
    if c.evals.every < 0:
        fail("evals.every", f"must be ≥ 0 (0 = no evals), got {c.evals.every}")
    if c.evals.every and c.evals.dataset not in sources.LABELLED:
        fail("evals.dataset", f"must be one of {sources.LABELLED}, got {c.evals.dataset!r}")
    if c.evals.every and (not c.evals.probes or set(c.evals.probes) - set(PROBES)):
        fail("evals.probes", f"must be a non-empty subset of {PROBES}, got "
             f"{c.evals.probes!r}")
    if c.evals.every and c.evals.test_split and c.evals.dataset not in sources.WITH_SPLITS:
        fail("evals.test_split", f"{c.evals.dataset} has no named splits; use evals.test_path "
             "(a folder) or evals.test_fraction")
    if c.evals.every and c.evals.test_path and c.evals.dataset != "folder":
        fail("evals.test_path", f"only for a folder dataset, not {c.evals.dataset}")
    if c.total_steps < 0 or c.epochs < 0:
        fail("total_steps",
             f"must not be negative (total_steps={c.total_steps}, epochs={c.epochs})")
    for field in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if c[field] < 1:
            fail(field, f"must be ≥ 1, got {c[field]}")
    if c.profile_steps < 0:
        fail("profile_steps", f"must be ≥ 0 (0 = no profile), got {c.profile_steps}")
    try:
        names, sizes = mesh_lib.resolve_axis_sizes(c.mesh, num_devices)
        vit_config(c)
    except ValueError as e:
        raise ValueError(f"config: {e}") from None
    data_shards = math.prod(s for n, s in zip(names, sizes) if n in mesh_lib.BATCH_AXES)
    if c.grad_accum < 1 or c.batch_size % c.grad_accum:
        fail("grad_accum", f"must divide batch_size {c.batch_size}, got {c.grad_accum}")
    micro = c.batch_size // c.grad_accum
    if micro % data_shards:
        fail("batch_size", f"the micro-batch {micro} (batch_size / grad_accum) is not divisible by "
             f"the {data_shards} batch shards of mesh {dict(zip(names, sizes))}; change the batch "
             "size, grad_accum or the mesh")


def warnings(c: ml_collections.ConfigDict, total_steps: int, num_examples: int | None) -> list[str]:
    """What is legal but probably not meant, said when a run starts."""
    said = []
    if c.optim.warmup_steps >= total_steps > 1:
        said.append(f"config.optim.warmup_steps {c.optim.warmup_steps:,} is not shorter than this "
                    f"run's {total_steps:,} steps: the learning rate rises until the last step "
                    "and never decays; lower warmup_steps")
    if (c.epochs and num_examples is not None and c.data.num_examples
            and c.data.num_examples != num_examples):
        said.append(f"config.data.num_examples {c.data.num_examples:,} is ignored: the data has "
                    f"{num_examples:,} examples, so {c.epochs:g} epochs are {total_steps:,} steps")
    if c.model.remat and not c.model.scan:
        said.append("config.model.remat without config.model.scan: unrolled, XLA may schedule the "
                    "recomputation early and keep the memory (XLA:CPU saves nothing: B/16 at batch "
                    "32, 8.4 GiB of temporaries either way); set config.model.scan=True")
    return said


def laion400m_recipe(size: str, *, lr: float, embed_dim: int) -> ml_collections.ConfigDict:
    """The paper's pretraining recipe (MLCD, ECCV 2024, §4.1) for a ViT `size` at 224 px."""
    c = base_config()
    c.model.size = size
    c.model.pos = "learned"                 # the released B/32 and L/14 models are CLIP-style
    c.model.embed_dim = embed_dim
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan = True
    c.head.loss = "mlcd"
    c.head.num_classes = 1_000_000
    c.head.sample_ratio = 0.1
    c.head.margin = 0.3
    c.head.scale = 32.0
    c.head.margin_type = "arcface"
    c.head.margin_grad = "straight_through" # as the authors' code applies the margin
    c.data.source = "arrayrecord"           # LAION-400M with cluster labels (issue 5's pipeline)
    c.data.image_size = 224
    c.data.num_labels = 8
    c.data.num_examples = 400_000_000
    c.batch_size = 32_768
    c.epochs = 32.0
    c.optim.lr = lr
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 2_000
    c.mesh = (("data", -1),)
    return c
