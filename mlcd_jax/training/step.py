"""The train step, apart from any command line: the state (ViT, class centers, AdamW moments) and
its shardings, one jitted step over `grad_accum` micro-batches with the sharded head, and `build`,
which makes all of it abstract for a config and a mesh. The trainer (`mlcd_jax.train`), the TPU
planner (`mlcd_jax.plan`) and `bench/train_step.py` compile this same step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from mlcd_jax.config import schema
from mlcd_jax.data import transforms
from mlcd_jax.models import region as region_lib, vit
from mlcd_jax.runtime import backend, checkpoint, mesh as mesh_lib
from mlcd_jax.training import (
    input as input_lib,
    optim,
    region_heads as heads_lib,
    validation,
)


def init_state(key, *, model_cfg, num_rows, tx, region_layers: int = 0,
               region_rows: dict[str, int] | None = None):
    """The train state, created from `key`: a pure function, so jit can create it sharded. With
    region heads ({name: padded rows}) also the Region Transformer layers and their centers."""
    model_key, centers_key, region_key = jax.random.split(key, 3)
    encoder = nnx.to_pure_dict(nnx.state(vit.ViT(model_cfg, rngs=nnx.Rngs(model_key))))
    width = model_cfg.embed_dim or model_cfg.width
    centers = jax.random.normal(centers_key, (num_rows, width), jnp.float32) * width ** -0.5
    params = {"encoder": encoder, "centers": centers}
    if region_rows:
        layers_key, *head_keys = jax.random.split(region_key, 1 + len(region_rows))
        params["region"] = nnx.to_pure_dict(nnx.state(region_lib.RegionLayers(
            model_cfg, region_layers, rngs=nnx.Rngs(layers_key))))
        params["region_centers"] = {
            name: jax.random.normal(k, (rows, width), jnp.float32) * width ** -0.5
            for k, (name, rows) in zip(head_keys, region_rows.items())}
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def train_step(state, batch, *, graphdef, tx, lr_schedule, mesh, head_cfg, seed,
               region_graphdef=None, region_heads=()):
    """One optimizer step over `grad_accum` micro-batches; the key folds in the step. `batch`:
    (images, labels) (grad_accum, micro, H, W, 3), (grad_accum, micro, l), the images at native
    resolution {"patches", "positions", "mask"} (grad_accum, micro, T, ...); with region heads
    also {"boxes": (…, N, 4), "labels": {name: (…, N, l)}}."""
    images = batch[0]
    if isinstance(images, dict):  # native resolution: patches, their positions and mask
        patches = images["patches"]
        if patches.dtype == jnp.uint8:
            patches = transforms.normalize_patches(patches.astype(jnp.float32))
        images = vit.Patches(patches, images["positions"], images["mask"])
    elif images.dtype == jnp.uint8:  # real images travel as uint8: 4× less host → device traffic
        images = transforms.normalize(images.astype(jnp.float32))
    batch = (images, *batch[1:])
    accum = batch[1].shape[0]  # micro-batches
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    loss_fn = functools.partial(heads_lib.loss, image_cfg=head_cfg,
                                region_heads=region_heads, mesh=mesh)

    def micro_step(params, batch, key):
        def f(params):
            images, labels, *regions = batch
            encoder = nnx.merge(graphdef, params["encoder"])
            out = encoder(images)
            region_embedding, region_labels = None, {}
            if region_heads:
                layers = nnx.merge(region_graphdef, params["region"])
                where = images if isinstance(images, vit.Patches) else images.shape[1:3]
                region_embedding = region_lib.embed(encoder, layers, out, regions[0]["boxes"],
                                                    where)
                region_labels = regions[0]["labels"]
            return loss_fn(out.embedding, params["centers"], labels, region_embedding,
                           params.get("region_centers"), region_labels, key=key)
        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, {"loss": loss, **metrics}

    params = state["params"]
    micro = lambda i: jax.tree.map(lambda x: x[i], batch)
    if accum == 1:
        grads, metrics = micro_step(params, micro(0), key)
    else:
        def accumulate(carry, xs):
            i, part = xs
            grads, metrics = micro_step(params, part, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_step, params, micro(0), key))
        total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), batch))
        grads, metrics = jax.tree.map(lambda x: x / accum, total)
    extra = {}  # sparse center updates: the rows used by any micro-batch
    if "rows_used" in metrics:
        extra["rows_used"] = metrics.pop("rows_used")
    updates, opt_state = tx.update(grads, state["opt_state"], params, **extra)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics |= {"grad_norm": optax.global_norm(grads), "lr": lr_schedule(state["step"])}
    if isinstance(images, vit.Patches):  # the batch's share of padding tokens
        metrics["padding"] = 1.0 - jnp.mean(images.mask.astype(jnp.float32))
    return new_state, metrics


def state_shardings(abstract_state, abstract_encoder, mesh, abstract_region=None):
    """Shardings of the train state {"params": {"encoder", "centers", "region_centers"?},
    "opt_state", "step"}: encoder parameters by their logical axes (FSDP), every head's centers
    over every device, every optimizer subtree shaped like the parameters (Adam's moments) as the
    parameters, the rest (counters) replicated."""
    params = {"encoder": nnx.to_pure_dict(mesh_lib.param_shardings(abstract_encoder, mesh)),
              "centers": mesh_lib.class_sharding(mesh)}
    if "region_centers" in abstract_state["params"]:  # RICE's region heads, each its own K,
        params["region_centers"] = {name: mesh_lib.class_sharding(mesh)  # and the region
                                    for name in abstract_state["params"]["region_centers"]}
        params["region"] = nnx.to_pure_dict(mesh_lib.param_shardings(abstract_region, mesh))
    structures = {jax.tree.structure(abstract_state["params"]): params,
                  jax.tree.structure(abstract_state["params"]["encoder"]): params["encoder"]}
    if "region" in params:
        structures[jax.tree.structure(abstract_state["params"]["region"])] = params["region"]
    like = lambda x: jax.tree.structure(x) in structures or isinstance(x, optim.SparseRowsState)

    def shard(x):
        if isinstance(x, optim.SparseRowsState):  # rows split as the centers, the step whole
            rows = mesh_lib.class_sharding(mesh)
            return optim.SparseRowsState(rows, rows, rows, mesh_lib.replicated(mesh))
        return structures[jax.tree.structure(x)] if like(x) else mesh_lib.replicated(mesh)

    opt_state = jax.tree.map(shard, abstract_state["opt_state"], is_leaf=like)
    return {"params": params, "opt_state": opt_state, "step": mesh_lib.replicated(mesh)}


class Built(NamedTuple):
    """What the trainer (and `mlcd_jax.plan`) needs to compile and run the train step on a mesh."""
    c: Any
    total_steps: int
    model_cfg: vit.ViTConfig
    head_cfg: schema.Head
    graphdef: Any
    init: Callable                # key → state (jit it with out_shardings=shardings)
    shardings: Any
    abstract_state: Any           # ShapeDtypeStructs with shardings: compile / restore target
    batch_sharding: NamedSharding
    abstract_batch: tuple         # (images, labels[, regions]), (grad_accum, micro, ...) sharded
    step_fn: Callable             # jitted train step, state donated
    replicated: list[str]         # large parameters a mesh axis was meant to split but cannot
    region_heads: tuple = ()      # heads.RegionHead of config.heads
    region_graphdef: Any = None   # the Region Transformer layers' (with region heads)

    def describe(self) -> str:
        n = sum(math.prod(x.shape)
                for x in jax.tree.leaves(self.abstract_state["params"]["encoder"]))
        size = self.c.model.size or f"width {self.model_cfg.width} depth {self.model_cfg.depth}"
        width = self.model_cfg.embed_dim or self.model_cfg.width
        regions = "".join(f", region head {h.name} {h.num_classes:,} × {width} centers"
                          for h in self.region_heads)
        if self.region_heads:
            r = sum(math.prod(x.shape)
                    for x in jax.tree.leaves(self.abstract_state["params"]["region"]))
            regions = (f", {self.c.model.region_layers} region layers {r / 1e6:.2f}M params, "
                       f"{self.c.data.regions_per_image} regions per image" + regions)
        native = transforms.native_sizing(self.c.data, self.model_cfg.patch)
        resolution = f", {native}" if native else ""
        return (f"encoder {self.model_cfg.pos} {size} {n / 1e6:.2f}M params{resolution}, head "
                f"{self.c.head.num_classes:,} × {width} centers{regions}")


def build(c, mesh, total_steps: int, model_cfg: vit.ViTConfig,
          head_cfg: schema.Head) -> Built:
    """The model, head, optimizer and jitted train step of config `c` on `mesh`, all abstract,
    for a schedule of `total_steps`; `model_cfg` and `head_cfg` as `validation.validate` made
    them."""
    # "auto" resolves for the platform the step is compiled for (a plan's GPUs, not this CPU).
    model_cfg = dataclasses.replace(model_cfg, attention=backend.attention(
        model_cfg.attention, model_cfg.dtype, backend.target(mesh.devices.flat)))
    num_rows = mesh_lib.padded_num_classes(c.head.num_classes, mesh.size)

    # Data layout: batch `step` is (grad_accum, micro, ...), micro split over the batch axes.
    batch_shape = (c.grad_accum, c.batch_size // c.grad_accum)
    batch_sharding = mesh_lib.batch_sharding(mesh, leading=1)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(batch_shape + shape, dtype,
                                                     sharding=batch_sharding)
    native = transforms.native_sizing(c.data, model_cfg.patch)
    if native is None:
        images = spec((c.data.image_size, c.data.image_size, 3), input_lib.image_dtype(c))
    else:  # every image as max_tokens patch rows (`transforms.patchify`)
        tokens, p = native.max_tokens, model_cfg.patch
        images = {"patches": spec((tokens, p * p * model_cfg.channels), input_lib.image_dtype(c)),
                  "positions": spec((tokens, 2), jnp.int32), "mask": spec((tokens,), jnp.bool_)}
    abstract_batch = (images, spec((c.data.num_labels,), jnp.int32))
    region_heads = validation.region_heads(c)  # RICE's region heads beside the image head
    if region_heads:
        slots = c.data.regions_per_image
        abstract_batch += ({"boxes": spec((slots, 4), jnp.float32),
                            "labels": {h.name: spec((slots, h.num_labels), jnp.int32)
                                       for h in region_heads}},)

    # Model, head and optimizer: shapes first; a jitted init creates them sharded.
    tx = optim.make_optimizer(c.optim, total_steps, centers_lr_mult=c.head.lr_mult,
                              sparse_centers=head_cfg.center_update == "sparse",
                              region_lr_mults={h.name: h.lr_mult for h in region_heads})
    graphdef, abstract_encoder = nnx.split(nnx.eval_shape(lambda: vit.ViT(model_cfg,
                                                                         rngs=nnx.Rngs(0))))
    region_graphdef = abstract_region = None
    if region_heads:
        region_graphdef, abstract_region = nnx.split(nnx.eval_shape(
            lambda: region_lib.RegionLayers(model_cfg, c.model.region_layers,
                                            rngs=nnx.Rngs(0))))
    init = functools.partial(
        init_state, model_cfg=model_cfg, num_rows=num_rows, tx=tx,
        region_layers=c.model.region_layers,
        region_rows={h.name: mesh_lib.padded_num_classes(h.num_classes, mesh.size)
                     for h in region_heads})
    abstract_state = jax.eval_shape(init, jax.random.key(0))
    shardings = state_shardings(abstract_state, abstract_encoder, mesh, abstract_region)

    # The train step: explicit shardings, the state donated.
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx,
                          lr_schedule=optim.schedule(c.optim, total_steps), mesh=mesh,
                          head_cfg=head_cfg, seed=c.seed, region_graphdef=region_graphdef,
                          region_heads=region_heads),
        in_shardings=(shardings, jax.tree.map(lambda _: batch_sharding, abstract_batch)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    replicated = mesh_lib.replicated_parameters(abstract_encoder, mesh)
    if abstract_region is not None:
        replicated += mesh_lib.replicated_parameters(abstract_region, mesh)
    return Built(c, total_steps, model_cfg, head_cfg, graphdef, init, shardings,
                 checkpoint.abstract_like(abstract_state, shardings), batch_sharding,
                 abstract_batch, step_fn, replicated, region_heads, region_graphdef)


def summarize(built: Built, mesh, compiled=None) -> str:
    """Steps, mesh, model and the compiled step's per-device memory, in one line."""
    compiled = compiled or built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
    mem = compiled.memory_analysis()
    kind = mesh.devices.flat[0].device_kind
    return (f"{built.total_steps} steps on {mesh.size} devices ({kind}) {dict(mesh.shape)}; "
            f"{built.describe()}; per device: arguments {mem.argument_size_in_bytes / 2**20:.1f} "
            f"MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB")
