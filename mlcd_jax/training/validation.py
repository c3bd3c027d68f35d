"""What a trainer config means on this machine, checked before any compute: every field against
its section (`config/schema.py`), then what the fields mean together: the mesh against the
devices, the batch against the mesh, the model's size and resolution, the region heads against the
model and data; and what is legal but probably not meant."""

from __future__ import annotations

import math

import ml_collections

from mlcd_jax.config import schema
from mlcd_jax.data import transforms
from mlcd_jax.models import vit
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.runtime.errors import UserError


def validate(c: ml_collections.ConfigDict,
             num_devices: int) -> tuple[vit.ViTConfig, schema.Head]:
    """The model's and the image head's configs, made once here and handed to `step.build`
    (`c` as `schema.upgrade` made it); any mistake raises UserError naming the field and the fix,
    before anything is compiled."""
    def fail(field, message):
        raise UserError(f"config.{field}: {message}")

    schema.check(c)
    if bool(c.total_steps) == bool(c.epochs):
        fail("total_steps", "set exactly one of config.total_steps and config.epochs "
             f"(got total_steps={c.total_steps}, epochs={c.epochs})")
    if c.head.label_columns > c.data.num_labels:
        fail("head.label_columns", f"{c.head.label_columns} columns of data.num_labels = "
             f"{c.data.num_labels}: at most that many")
    if c.evals.every:
        if c.evals.source not in schema.LABELLED:
            fail("evals.source", f"must be one of {schema.LABELLED} (labelled images to probe), "
                 f"got {c.evals.source!r}")
        if c.evals.test_split and c.evals.source not in schema.WITH_SPLITS:
            fail("evals.test_split", f"{c.evals.source} has no named splits; use "
                 "evals.test_path (a folder) or evals.test_fraction")
        if c.evals.test_path and c.evals.source != "folder":
            fail("evals.test_path", f"only for a folder source, not {c.evals.source}")
    try:
        names, sizes = mesh_lib.resolve_axis_sizes(c.mesh, num_devices)
    except UserError as e:
        raise UserError(f"config: {e}") from None
    data_shards = math.prod(s for n, s in zip(names, sizes) if n in mesh_lib.BATCH_AXES)
    if c.batch_size % c.grad_accum:
        fail("grad_accum", f"must divide batch_size {c.batch_size}, got {c.grad_accum}")
    micro = c.batch_size // c.grad_accum
    if micro % data_shards:
        fail("batch_size", f"the micro-batch {micro} (batch_size / grad_accum) is not divisible by "
             f"the {data_shards} batch shards of mesh {dict(zip(names, sizes))}; change the batch "
             "size, grad_accum or the mesh")
    region_heads(c)  # checked now; `step.build` makes them again
    model_cfg = model_config(c)
    resolution(c, model_cfg)
    return model_cfg, schema.head(c)


def resolution(c: ml_collections.ConfigDict, model_cfg: vit.ViTConfig) -> None:
    """The data's resolution fields against the model's patch (`transforms.native_sizing` reads
    them)."""
    d = c.data
    if d.resolution in ("square", "squash"):
        if d.max_tokens or d.min_tokens:
            raise UserError("config.data.max_tokens: token budgets are for "
                            f"config.data.resolution=native; {d.resolution} images have "
                            "(data.image_size / patch)² patches")
        if d.resolution == "squash" and d.image_size % model_cfg.patch:
            raise UserError(f"config.data.image_size: {d.image_size} is not a multiple of the "
                            f"patch {model_cfg.patch}")
        return
    if d.image_size % model_cfg.patch and not d.max_tokens:
        raise UserError(f"config.data.max_tokens: 0 means (data.image_size / patch)², but "
                        f"image_size {d.image_size} is not a multiple of patch "
                        f"{model_cfg.patch}; set max_tokens")
    budget = d.max_tokens or (d.image_size // model_cfg.patch) ** 2
    if d.min_tokens > budget:
        raise UserError(f"config.data.min_tokens: {d.min_tokens} is more than the {budget} of "
                        "max_tokens; lower it (0: fill the budget)")
    native = transforms.native_sizing(d, model_cfg.patch)
    grid = (d.image_size // model_cfg.patch) ** 2
    if d.source == "synthetic" and grid > native.max_tokens:
        raise UserError(f"config.data.max_tokens: synthetic images are data.image_size² "
                        f"squares, {grid} patches, more than max_tokens {native.max_tokens}; "
                        "raise max_tokens or lower data.image_size")


def region_heads(c: ml_collections.ConfigDict) -> tuple[schema.RegionHead, ...]:
    """The region heads of `config.heads` (each checked: a mistake names `heads.NAME.field`),
    and what they need of the model and data."""
    found = schema.region_heads(c)
    if found:
        if c.model.region_layers < 1:
            raise UserError(f"config.model.region_layers: the region heads "
                            f"({', '.join(h.name for h in found)}) need the Region Transformer "
                            "layer: set it ≥ 1")
        if c.data.regions_per_image < 1:
            raise UserError("config.data.regions_per_image: the region heads need region slots "
                            "per image: set it ≥ 1 (RICE samples N regions per image)")
        if c.head.center_update == "sparse" or any(h.center_update == "sparse" for h in found):
            raise UserError("config.head.center_update: sparse center updates are for the image "
                            "head alone; with region heads use dense")
    return found


def model_config(c: ml_collections.ConfigDict) -> vit.ViTConfig:
    try:
        return vit.from_config(c)
    except UserError as e:
        raise UserError(f"config: {e}") from None


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
