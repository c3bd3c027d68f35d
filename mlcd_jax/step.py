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

from mlcd_jax import checkpoint, head, mesh as mesh_lib, optim, platform
from mlcd_jax.data import input as input_lib, transforms
from mlcd_jax.models import vit


def init_state(key, *, model_cfg, num_rows, tx):
    """The train state, created from `key`: a pure function, so jit can create it sharded."""
    model_key, centers_key = jax.random.split(key)
    encoder = nnx.to_pure_dict(nnx.state(vit.ViT(model_cfg, rngs=nnx.Rngs(model_key))))
    width = model_cfg.embed_dim or model_cfg.width
    centers = jax.random.normal(centers_key, (num_rows, width), jnp.float32) * width ** -0.5
    params = {"encoder": encoder, "centers": centers}
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def train_step(state, batch, *, graphdef, tx, lr_schedule, mesh, head_cfg, seed):
    """One optimizer step over `grad_accum` micro-batches; the key folds in the step."""
    images, labels = batch  # (grad_accum, micro, H, W, 3), (grad_accum, micro, l)
    if images.dtype == jnp.uint8:  # real images travel as uint8: 4× less host → device traffic
        images = transforms.normalize(images.astype(jnp.float32))
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    loss_fn = functools.partial(head.loss, cfg=head_cfg, mesh=mesh)

    def micro_step(params, images, labels, key):
        def f(params):
            embedding = nnx.merge(graphdef, params["encoder"])(images).embedding
            return loss_fn(embedding, params["centers"], labels, key=key)
        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, {"loss": loss, **metrics}

    params = state["params"]
    if images.shape[0] == 1:
        grads, metrics = micro_step(params, images[0], labels[0], key)
    else:
        def accumulate(carry, xs):
            i, (img, lab) = xs
            grads, metrics = micro_step(params, img, lab, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_step, params, images[0],
                                                            labels[0], key))
        total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(images.shape[0]), (images, labels)))
        grads, metrics = jax.tree.map(lambda x: x / images.shape[0], total)
    extra = {}  # sparse center updates: the rows used by any micro-batch
    if "rows_used" in metrics:
        extra["rows_used"] = metrics.pop("rows_used")
    updates, opt_state = tx.update(grads, state["opt_state"], params, **extra)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics |= {"grad_norm": optax.global_norm(grads), "lr": lr_schedule(state["step"])}
    return new_state, metrics


class Built(NamedTuple):
    """What the trainer (and `mlcd_jax.plan`) needs to compile and run the train step on a mesh."""
    c: Any
    total_steps: int
    model_cfg: vit.ViTConfig
    head_cfg: head.HeadConfig
    graphdef: Any
    init: Callable                # key → state (jit it with out_shardings=shardings)
    shardings: Any
    abstract_state: Any           # ShapeDtypeStructs with shardings: compile / restore target
    batch_sharding: NamedSharding
    abstract_batch: tuple         # (images, labels), (grad_accum, micro, ...) with shardings
    step_fn: Callable             # jitted train step, state donated
    replicated: list[str]         # large parameters a mesh axis was meant to split but cannot

    def describe(self) -> str:
        n = sum(math.prod(x.shape)
                for x in jax.tree.leaves(self.abstract_state["params"]["encoder"]))
        size = self.c.model.size or f"width {self.model_cfg.width} depth {self.model_cfg.depth}"
        return (f"encoder {self.model_cfg.pos} {size} {n / 1e6:.2f}M params, head "
                f"{self.c.head.num_classes:,} × {self.model_cfg.embed_dim or self.model_cfg.width} "
                "centers")


def build(c, mesh, total_steps: int, model_cfg: vit.ViTConfig,
          head_cfg: head.HeadConfig) -> Built:
    """The model, head, optimizer and jitted train step of config `c` on `mesh`, all abstract,
    for a schedule of `total_steps`; `model_cfg` and `head_cfg` as `validation.validate` made
    them."""
    # "auto" resolves for the platform the step is compiled for (a plan's GPUs, not this CPU).
    model_cfg = dataclasses.replace(model_cfg, attention=platform.attention(
        model_cfg.attention, model_cfg.dtype, platform.target(mesh.devices.flat)))
    num_rows = mesh_lib.padded_num_classes(c.head.num_classes, mesh.size)

    # Data layout: batch `step` is (grad_accum, micro, ...), micro split over the batch axes.
    batch_shape = (c.grad_accum, c.batch_size // c.grad_accum)
    batch_sharding = mesh_lib.batch_sharding(mesh, leading=1)
    image_shape = (c.data.image_size, c.data.image_size, 3)
    abstract_batch = (jax.ShapeDtypeStruct(batch_shape + image_shape, input_lib.image_dtype(c),
                                           sharding=batch_sharding),
                      jax.ShapeDtypeStruct(batch_shape + (c.data.num_labels,), jnp.int32,
                                           sharding=batch_sharding))

    # Model, head and optimizer: shapes first; a jitted init creates them sharded.
    tx = optim.make_optimizer(c.optim, total_steps, centers_lr_mult=c.head.lr_mult,
                              sparse_centers=head_cfg.center_update == "sparse")
    graphdef, abstract_encoder = nnx.split(nnx.eval_shape(lambda: vit.ViT(model_cfg,
                                                                         rngs=nnx.Rngs(0))))
    init = functools.partial(init_state, model_cfg=model_cfg, num_rows=num_rows, tx=tx)
    abstract_state = jax.eval_shape(init, jax.random.key(0))
    shardings = mesh_lib.state_shardings(abstract_state, abstract_encoder, mesh)

    # The train step: explicit shardings, the state donated.
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx,
                          lr_schedule=optim.schedule(c.optim, total_steps), mesh=mesh,
                          head_cfg=head_cfg, seed=c.seed),
        in_shardings=(shardings, (batch_sharding, batch_sharding)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    return Built(c, total_steps, model_cfg, head_cfg, graphdef, init, shardings,
                 checkpoint.abstract_like(abstract_state, shardings), batch_sharding,
                 abstract_batch, step_fn, mesh_lib.replicated_parameters(abstract_encoder, mesh))


def summarize(built: Built, mesh, compiled=None) -> str:
    """Steps, mesh, model and the compiled step's per-device memory, in one line."""
    compiled = compiled or built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
    mem = compiled.memory_analysis()
    kind = mesh.devices.flat[0].device_kind
    return (f"{built.total_steps} steps on {mesh.size} devices ({kind}) {dict(mesh.shape)}; "
            f"{built.describe()}; per device: arguments {mem.argument_size_in_bytes / 2**20:.1f} "
            f"MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB")
