"""What a trainer config means on this machine, checked before any compute: the mesh against the
devices, the batch against the mesh, each field's range (the model's and the head's options are
checked where they are made, `step.build`); and what is legal but probably not meant."""

from __future__ import annotations

import math

import ml_collections

from mlcd_jax.config import schema as config_lib
from mlcd_jax.data import sources
from mlcd_jax.evaluate.probes import PROBES
from mlcd_jax.labels import join
from mlcd_jax.models import vit
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.runtime.errors import UserError
from mlcd_jax.training import region_heads as heads_lib, sharded_head as head


def validate(c: ml_collections.ConfigDict,
             num_devices: int) -> tuple[vit.ViTConfig, head.HeadConfig]:
    """The model's and the head's configs, made once here and handed to `step.build`; any
    mistake raises ValueError naming the field and the fix, before anything is compiled."""
    def fail(field, message):
        raise UserError(f"config.{field}: {message}")

    if bool(c.total_steps) == bool(c.epochs):
        fail("total_steps", "set exactly one of config.total_steps and config.epochs "
             f"(got total_steps={c.total_steps}, epochs={c.epochs})")
    if c.data.source not in sources.SOURCES:
        fail("data.source", f"must be one of {sources.SOURCES}, got {c.data.source!r}")
    if c.data.workers < -1:
        fail("data.workers", f"must be ≥ -1 (-1 = automatic, 0 = none), got {c.data.workers}")
    if c.data.num_labels < 1:
        fail("data.num_labels", f"must be ≥ 1, got {c.data.num_labels}")
    if c.data.missing_labels not in join.MISSING:
        fail("data.missing_labels", f"must be one of {join.MISSING}, got "
             f"{c.data.missing_labels!r}")
    if c.head.label_columns > c.data.num_labels:
        fail("head.label_columns", f"{c.head.label_columns} columns of data.num_labels = "
             f"{c.data.num_labels}: at most that many")
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
    except UserError as e:
        raise UserError(f"config: {e}") from None
    data_shards = math.prod(s for n, s in zip(names, sizes) if n in mesh_lib.BATCH_AXES)
    if c.grad_accum < 1 or c.batch_size % c.grad_accum:
        fail("grad_accum", f"must divide batch_size {c.batch_size}, got {c.grad_accum}")
    micro = c.batch_size // c.grad_accum
    if micro % data_shards:
        fail("batch_size", f"the micro-batch {micro} (batch_size / grad_accum) is not divisible by "
             f"the {data_shards} batch shards of mesh {dict(zip(names, sizes))}; change the batch "
             "size, grad_accum or the mesh")
    region_heads(c)  # checked now; `step.build` makes them again
    model_cfg = model_config(c)
    resolution(c, model_cfg)
    return model_cfg, head_config(c)


def resolution(c: ml_collections.ConfigDict, model_cfg: vit.ViTConfig) -> None:
    """The data's resolution fields (`config_lib.native` reads them)."""
    d = c.data
    if d.get("resolution", "square") not in config_lib.RESOLUTIONS:
        raise UserError(f"config.data.resolution: must be one of {config_lib.RESOLUTIONS}, "
                        f"got {d.resolution!r}")
    if d.get("resolution", "square") in ("square", "squash"):
        if d.get("max_tokens", 0) or d.get("min_tokens", 0):
            raise UserError("config.data.max_tokens: token budgets are for "
                            f"config.data.resolution=native; {d.get('resolution', 'square')} "
                            "images have (data.image_size / patch)² patches")
        if d.get("resolution", "square") == "squash" and d.image_size % model_cfg.patch:
            raise UserError(f"config.data.image_size: {d.image_size} is not a multiple of the "
                            f"patch {model_cfg.patch}")
        return
    for field in ("max_tokens", "min_tokens"):
        if d[field] < 0:
            raise UserError(f"config.data.{field}: must be ≥ 0, got {d[field]}")
    if d.image_size % model_cfg.patch and not d.max_tokens:
        raise UserError(f"config.data.max_tokens: 0 means (data.image_size / patch)², but "
                        f"image_size {d.image_size} is not a multiple of patch "
                        f"{model_cfg.patch}; set max_tokens")
    budget = d.max_tokens or (d.image_size // model_cfg.patch) ** 2
    if d.min_tokens > budget:
        raise UserError(f"config.data.min_tokens: {d.min_tokens} is more than the {budget} of "
                        "max_tokens; lower it (0: fill the budget)")
    native = config_lib.native(c, model_cfg.patch)
    grid = (d.image_size // model_cfg.patch) ** 2
    if d.source == "synthetic" and grid > native.max_tokens:
        raise UserError(f"config.data.max_tokens: synthetic images are data.image_size² "
                        f"squares, {grid} patches, more than max_tokens {native.max_tokens}; "
                        "raise max_tokens or lower data.image_size")


def region_heads(c: ml_collections.ConfigDict) -> tuple[heads_lib.RegionHead, ...]:
    """The region heads of `config.heads`, each checked (a mistake names `heads.NAME.field`)."""
    found = []
    for name, h in c.get("heads", {}).items():
        where = f"heads.{name}"

        def fail(field, message):
            raise UserError(f"config.{where}.{field}: {message}")

        if h.regions not in heads_lib.REGIONS:
            fail("regions", f"must be one of {heads_lib.REGIONS}, got {h.regions!r}")
        if h.num_classes < 1:
            fail("num_classes", f"must be ≥ 1 (K of its label store), got {h.num_classes}")
        if h.num_labels < 1:
            fail("num_labels", f"must be ≥ 1, got {h.num_labels}")
        if h.missing_labels not in join.MISSING:
            fail("missing_labels", f"must be one of {join.MISSING}, got {h.missing_labels!r}")
        if h.weight < 0 or h.lr_mult <= 0:
            fail("weight", f"weight must be ≥ 0 and lr_mult > 0, got {h.weight} and {h.lr_mult}")
        try:
            cfg = head.HeadConfig(
                loss=h.loss, scale=float(h.scale), margin=float(h.margin),
                margin_type=h.margin_type, margin_grad=h.margin_grad,
                sample_ratio=float(h.sample_ratio), num_classes=h.num_classes, chunk=h.chunk,
                matmul_dtype=h.matmul_dtype or ("float32" if c.model.dtype == "float32"
                                                else "bfloat16"),
                negatives=h.negatives, label_columns=h.label_columns,
                negative_filter=float(h.negative_filter), skip_unlabelled=True)
        except UserError as e:  # "head.FIELD: ..." from HeadConfig
            raise UserError(f"config.{where}.{str(e).removeprefix('head.')}") from None
        found.append(heads_lib.RegionHead(name, cfg, h.num_labels, float(h.weight),
                                          float(h.lr_mult), h.labels, h.regions,
                                          h.missing_labels))
    if found:
        if c.model.get("region_layers", 0) < 1:
            raise UserError(f"config.model.region_layers: the region heads "
                            f"({', '.join(h.name for h in found)}) need the Region Transformer "
                            "layer: set it ≥ 1")
        if c.data.get("regions_per_image", 0) < 1:
            raise UserError("config.data.regions_per_image: the region heads need region slots "
                            "per image: set it ≥ 1 (RICE samples N regions per image)")
        if c.head.get("center_update", "dense") == "sparse":
            raise UserError("config.head.center_update: sparse center updates are for the image "
                            "head alone; with region heads use dense")
    return tuple(found)


def model_config(c: ml_collections.ConfigDict) -> vit.ViTConfig:
    try:
        return config_lib.vit_config(c)
    except UserError as e:
        raise UserError(f"config: {e}") from None


def head_config(c: ml_collections.ConfigDict) -> head.HeadConfig:
    """The head's options from a config's `head` section (its `lr_mult` belongs to the
    optimizer); the matmuls run in the model's compute dtype unless head.matmul_dtype says
    otherwise. HeadConfig checks them all, in one place (a mistake names the config field)."""
    h = c.head
    try:
        return head.HeadConfig(
            loss=h.loss, scale=float(h.scale), margin=float(h.margin),
            margin_type=h.margin_type, margin_grad=h.margin_grad,
            sample_ratio=float(h.sample_ratio), num_classes=h.num_classes, chunk=h.chunk,
            matmul_dtype=h.matmul_dtype or ("float32" if c.model.dtype == "float32"
                                            else "bfloat16"),
            # a workdir's config.json from before these fields existed has the defaults
            negatives=h.get("negatives", "uniform"),
            center_update=h.get("center_update", "dense"),
            label_columns=h.get("label_columns", 0),
            negative_filter=float(h.get("negative_filter", 1.0)))
    except UserError as e:
        raise UserError(f"config.{e}") from None


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
