"""The one optimizer of every trainer: AdamW with linear warm-up + cosine decay, global-norm
clipping, decoupled weight decay on matrices (and class centers) only, and a learning-rate
multiplier for the class centers where there are any (the MLCD trainer; LiT's text tower has
none). The centers may be updated sparsely, as Partial FC v1 does: only the rows used this step
move, with their own AdamW moments and step counts."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mlcd_jax.runtime.errors import UserError


def schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """`config.optim`'s learning rate by step."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.end_lr_factor)


CENTERS = ("centers", "region_centers")  # params of class centers: the image head's, by region head


def _names(path) -> list:
    return [getattr(k, "key", None) for k in path]


def decay_mask(params):
    """Weight decay on matrices (kernels) and the class centers (every head's); not on norms,
    biases, embeddings, temperatures."""
    def decays(path, _):
        names = _names(path)
        return names[0] in CENTERS or names[-1] == "kernel"
    return jax.tree_util.tree_map_with_path(decays, params)


def _scaled_at(mult: float, *where) -> optax.GradientTransformation:
    """The updates of the params at path prefix `where` × `mult` (the rest unchanged)."""
    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: tuple(_names(path)[:len(where)]) == where, params)
    return optax.masked(optax.scale(mult), mask)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, *,
                   centers_lr_mult: float | None = None, sparse_centers: bool = False,
                   region_lr_mults: dict[str, float] | None = None
                   ) -> optax.GradientTransformation:
    """clip → AdamW, from `config.optim`; with `centers_lr_mult` (params {"encoder", "centers"})
    → the centers' updates × it (AdamW's update is −lr·(…), so scaling it equals AdamW with
    lr × lr_mult for the centers), and each region head's centers (params["region_centers"][name])
    × its `region_lr_mults[name]`. Adam's moments mirror the params tree exactly. With
    `sparse_centers` (the image head alone), the centers get `sparse_rows_adamw` instead (its
    `update` then takes `rows_used`, the head's)."""
    clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity()
    adamw = optax.adamw(schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    if sparse_centers:
        if region_lr_mults:
            raise UserError("config.head.center_update: sparse center updates are for the image "
                            "head alone; with region heads (config.heads) use dense")
        return _encoder_dense_centers_sparse(clip, adamw, sparse_rows_adamw(
            schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
            weight_decay=optim.weight_decay, lr_mult=centers_lr_mult or 1.0))
    stages = [clip, adamw]
    if centers_lr_mult is not None:
        stages.append(optax.masked(optax.scale(centers_lr_mult),
                                   {"encoder": False, "centers": True} if not region_lr_mults
                                   else lambda params: {k: k == "centers" for k in params}))
    for name, mult in (region_lr_mults or {}).items():
        if mult != 1.0:
            stages.append(_scaled_at(mult, "region_centers", name))
    return optax.chain(*stages)


class SparseRowsState(NamedTuple):
    """AdamW's state of the class centers under sparse updates: each row's moments and its own
    step count (a row not used keeps all three as they are); `step` counts optimizer steps, for
    the schedule. The field names hold "centers": checkpoints resize them with the centers'
    padding rows on another device count."""
    centers_mu: jax.Array      # (K, D)
    centers_nu: jax.Array      # (K, D)
    centers_count: jax.Array   # (K, 1) int32: times each row was updated
    step: jax.Array            # () int32


def sparse_rows_adamw(learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float,
                      weight_decay: float, lr_mult: float = 1.0):
    """AdamW on the rows of a (K, D) matrix that `rows_used` (K,) marks, alone: their moments,
    bias corrections by their own step counts, decoupled weight decay, the learning rate of the
    schedule × `lr_mult`. Every other row, and its moments and count, stays bit for bit (Partial
    FC v1, insightface recognition/arcface_torch/partial_fc.py, swaps only the sampled rows and
    their optimizer state in and out). Used with every row, it is optax.adamw."""
    def init(params):
        zeros = jnp.zeros_like(params)
        return SparseRowsState(zeros, zeros, jnp.zeros((params.shape[0], 1), jnp.int32),
                               jnp.zeros((), jnp.int32))

    def update(grads, state, params, rows_used):
        used = rows_used.reshape(-1, 1) > 0
        count = state.centers_count + used.astype(jnp.int32)
        mu = jnp.where(used, b1 * state.centers_mu + (1 - b1) * grads, state.centers_mu)
        nu = jnp.where(used, b2 * state.centers_nu + (1 - b2) * grads * grads, state.centers_nu)
        t = jnp.maximum(count, 1).astype(jnp.float32)
        step = (mu / (1 - b1 ** t)) / (jnp.sqrt(nu / (1 - b2 ** t)) + eps) + weight_decay * params
        lr = learning_rate(state.step) * lr_mult
        updates = jnp.where(used, -lr * step, 0.0).astype(params.dtype)
        return updates, SparseRowsState(mu, nu, count, state.step + 1)

    return init, update


def _encoder_dense_centers_sparse(clip, adamw, sparse) -> optax.GradientTransformationExtraArgs:
    """clip over everything (the global norm counts the centers' gradients), then AdamW for the
    encoder and `sparse_rows_adamw` for the centers."""
    sparse_init, sparse_update = sparse

    def init(params):
        return (clip.init(params), adamw.init(params["encoder"]), sparse_init(params["centers"]))

    def update(grads, state, params, *, rows_used, **extra):
        grads, clip_state = clip.update(grads, state[0], params)
        encoder, adamw_state = adamw.update(grads["encoder"], state[1], params["encoder"])
        centers, rows_state = sparse_update(grads["centers"], state[2], params["centers"],
                                            rows_used)
        return {"encoder": encoder, "centers": centers}, (clip_state, adamw_state, rows_state)

    return optax.GradientTransformationExtraArgs(init, update)
