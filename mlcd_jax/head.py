"""The cluster-discrimination head: K class centers sharded over every device, sampled negatives.

Layout under a mesh of n devices (Partial FC style, DESIGN.md "Invariants"):

* `centers` (K, D) is split along K into n shards of K_local = ceil(K / n) rows (padded at the end;
  padded rows are never sampled and never positive). Shard i owns global classes
  [i·K_local, (i+1)·K_local), i being the device's linear index over all mesh axes.
* `features` and `labels` are split along the batch axes and all-gathered (B_global × D is small),
  so every device scores the whole batch against its own centers.
* Each shard draws ceil(r·K_local) distinct local classes from `key` folded with its shard index,
  scores the batch against them (B_global × r·K_local logits, never B × K), drops each sample's own
  positives, and reduces to one log-sum-exp per sample; shards merge with a pmax and a psum.
* A positive cosine is computed by the shard that owns the class and summed over shards (B × l).

No K × D or B × K array is ever gathered; gradients reach the features and only the center rows
that were used. `mesh=None` runs the same code on one device with no collectives.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mlcd_jax import losses, mesh as mesh_lib

Metrics = dict[str, jax.Array]


def num_sampled(num_local: int, sample_ratio: float) -> int:
    """Negatives drawn per shard: ceil(r · K_local), at least 1."""
    return max(1, math.ceil(sample_ratio * num_local))


def _draw_local_classes(key: jax.Array, shard: jax.Array, num_local: int, num_valid: jax.Array,
                        sample_ratio: float) -> tuple[jax.Array, jax.Array]:
    """Local row indices sampled on one shard, and whether each is a real (not padding) class.

    Distinct indices: the top-m of i.i.d. uniform scores is a uniform m-subset. Padding rows score
    below every real row, so they are drawn only when the shard has fewer than m real rows (and are
    then masked out). r = 1 takes every row, with no randomness.
    """
    m = num_sampled(num_local, sample_ratio)
    if m >= num_local:
        idx = jnp.arange(num_local, dtype=jnp.int32)
    else:
        scores = jax.random.uniform(jax.random.fold_in(key, shard), (num_local,))
        scores = jnp.where(jnp.arange(num_local) < num_valid, scores, -1.0)
        _, idx = jax.lax.top_k(scores, m)
        idx = idx.astype(jnp.int32)
    return idx, idx < num_valid


def sample_negative_classes(key: jax.Array, num_classes: int, *, num_shards: int = 1,
                            sample_ratio: float = 0.1) -> jax.Array:
    """The global class ids that each shard draws for `key`: (num_shards, m) int32, -1 = padding.

    The same draw the head makes inside the sharded loss (for analysis and tests).
    """
    num_local = mesh_lib.padded_num_classes(num_classes, num_shards) // num_shards

    def one(shard):
        num_valid = jnp.clip(num_classes - shard * num_local, 0, num_local)
        idx, valid = _draw_local_classes(key, shard, num_local, num_valid, sample_ratio)
        return jnp.where(valid, shard * num_local + idx, -1)

    return jax.vmap(one)(jnp.arange(num_shards))


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _shard_loss(features, centers, labels, key, *, kind: str, num_classes: int, scale: float,
                margin: float, margin_type: str, sample_ratio: float,
                class_axes: tuple[str, ...], batch_axes: tuple[str, ...]) -> tuple[jax.Array, Metrics]:
    """Loss on one shard of centers (the body of the shard_map; also the whole job for mesh=None)."""
    psum = (lambda x: jax.lax.psum(x, class_axes)) if class_axes else (lambda x: x)
    if batch_axes:  # "invarying": the gathered batch is the same on every device (and typed so)
        features, labels = jax.lax.all_gather((features, labels), batch_axes, axis=0, tiled=True,
                                              to="invarying")
    shard = jax.lax.axis_index(class_axes) if class_axes else jnp.int32(0)
    num_local = centers.shape[0]
    offset = shard * num_local
    num_valid = jnp.clip(num_classes - offset, 0, num_local)
    # Cast the replicated batch to "varying" once, so its cotangent is summed over the devices by
    # one B × D all-reduce (otherwise each use below would get its own).
    emb = jax.lax.pcast(_normalize(features), class_axes, to="varying")  # (B, D)

    # Positives: the owning shard computes each cosine, the others contribute 0.
    local = labels - offset                                               # (B, l)
    mine = (labels >= 0) & (local >= 0) & (local < num_local)
    local = jnp.clip(local, 0, num_local - 1)
    pos_rows = _normalize(centers[local])                                 # (B, l, D)
    pos_cos = psum(jnp.where(mine, jnp.einsum("bld,bd->bl", pos_rows, emb), 0.0))
    pos_mask = labels >= 0

    # Sampled negatives of this shard, minus each sample's own positives.
    idx, idx_valid = _draw_local_classes(key, shard, num_local, num_valid, sample_ratio)
    m = idx.shape[0]
    neg_cos = emb @ _normalize(centers[idx]).T                            # (B, m)
    slot = jnp.full((num_local,), m, jnp.int32).at[idx].set(jnp.arange(m, dtype=jnp.int32))
    pos_slot = jnp.where(mine, slot[local], m)                            # m = not drawn here
    is_pos = jnp.zeros(neg_cos.shape, bool).at[
        jnp.arange(labels.shape[0])[:, None], pos_slot].set(True, mode="drop")
    neg_mask = idx_valid[None, :] & ~is_pos
    neg_logits = scale * neg_cos

    pos_logits = losses.positive_logits(pos_cos, scale=scale, margin=margin, margin_type=margin_type)
    if kind == "mlcd":
        pos_term, neg_term = losses.mlcd_terms(pos_logits, pos_mask, neg_logits, neg_mask, class_axes)
        per_sample = pos_term + neg_term
        terms = {"pos_term": jnp.mean(pos_term), "neg_term": jnp.mean(neg_term)}
    else:
        log_partition, per_sample = losses.unicom_terms(pos_logits[:, 0], neg_logits, neg_mask,
                                                        class_axes)
        terms = {"pos_logit": jnp.mean(pos_logits[:, 0]), "log_partition": jnp.mean(log_partition)}

    num_neg = psum(jnp.sum(neg_mask, dtype=jnp.float32))
    metrics = {
        "pos_cos": jnp.sum(jnp.where(pos_mask, pos_cos, 0.0)) / jnp.maximum(jnp.sum(pos_mask), 1),
        "neg_cos": psum(jnp.sum(jnp.where(neg_mask, neg_cos, 0.0))) / jnp.maximum(num_neg, 1.0),
        "neg_per_sample": num_neg / labels.shape[0],
        **terms,
    }
    metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
    return jnp.mean(per_sample), metrics


def _check_args(features, centers, labels, *, margin_type, sample_ratio, num_classes, mesh):
    if features.ndim != 2 or centers.ndim != 2:
        raise ValueError(f"features must be (B, D) and centers (K, D); got features {features.shape}, "
                         f"centers {centers.shape}")
    if features.shape[1] != centers.shape[1]:
        raise ValueError(f"features have D = {features.shape[1]} but centers have D = "
                         f"{centers.shape[1]}; the head's embedding width must match the encoder's")
    if labels.ndim != 2 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be (B, l) with B = {features.shape[0]} (as features); got "
                         f"{labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids (-1 = padding); got dtype {labels.dtype}")
    if margin_type not in losses.MARGIN_TYPES:
        raise ValueError(f"margin_type must be one of {losses.MARGIN_TYPES}, got {margin_type!r}")
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
    if not 0 < num_classes <= centers.shape[0]:
        raise ValueError(f"num_classes = {num_classes} must be in [1, centers.shape[0] = "
                         f"{centers.shape[0]}] (rows beyond num_classes are padding)")
    if mesh is not None and features.shape[0] % mesh_lib.num_batch_shards(mesh):
        raise ValueError(f"global batch {features.shape[0]} is not divisible by the "
                         f"{mesh_lib.num_batch_shards(mesh)} batch shards of mesh axes "
                         f"{mesh_lib.batch_axes(mesh)}; change the batch size or the mesh")


def _head_loss(kind, features, centers, labels, *, key, scale, margin, margin_type, sample_ratio,
               mesh: Mesh | None, num_classes: int | None) -> tuple[jax.Array, Metrics]:
    labels = jnp.asarray(labels)
    if kind == "unicom":  # only the first label counts
        labels = labels.reshape(labels.shape[0], -1)[:, :1]
    num_classes = centers.shape[0] if num_classes is None else int(num_classes)
    _check_args(features, centers, labels, margin_type=margin_type, sample_ratio=sample_ratio,
                num_classes=num_classes, mesh=mesh)
    labels = labels.astype(jnp.int32)
    static: dict[str, Any] = dict(kind=kind, num_classes=num_classes, scale=float(scale),
                                  margin=float(margin), margin_type=margin_type,
                                  sample_ratio=float(sample_ratio))
    if mesh is None:
        return _shard_loss(features, centers, labels, key, class_axes=(), batch_axes=(), **static)

    padded = mesh_lib.padded_num_classes(centers.shape[0], mesh.size)
    if padded != centers.shape[0]:
        centers = jnp.pad(centers, ((0, padded - centers.shape[0]), (0, 0)))
    batch = mesh_lib.batch_spec(mesh)
    body = functools.partial(_shard_loss, class_axes=tuple(mesh.axis_names),
                             batch_axes=mesh_lib.batch_axes(mesh), **static)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(batch, mesh_lib.class_spec(mesh), batch, P()),
        out_specs=(P(), P()),
    )(features, centers, labels, key)


def mlcd_loss(features: jax.Array, centers: jax.Array, labels: jax.Array, *, key: jax.Array,
              scale: float = 32.0, margin: float = 0.3, margin_type: str = "arcface",
              sample_ratio: float = 0.1, mesh: Mesh | None = None,
              num_classes: int | None = None) -> tuple[jax.Array, Metrics]:
    """Multi-label cluster-discrimination loss (MLCD, DESIGN.md), mean over the global batch.

    Args:
      features: (B, D) embeddings, any float dtype; L2-normalised here, computed in float32.
      centers: (K, D) class centers; under `mesh`, sharded along K over every device.
      labels: (B, l) int class ids, most similar first; -1 pads a shorter list.
      key: PRNG key of this step (fold the step in before calling); each shard folds its index.
      scale, margin, margin_type: s, m and "arcface" (s·cos(θ + m)) or "cosface" (s·(cos θ − m)).
      sample_ratio: r; each shard draws ceil(r·K_local) negatives. 1.0 = all classes, exact.
      mesh: None for one device; else features/labels are split over its batch axes.
      num_classes: K when `centers` already holds padding rows past K (default: centers.shape[0]).

    Returns:
      (loss, metrics): float32 scalar loss; metrics `pos_cos`, `neg_cos` (mean cosine of positives
      and of sampled negatives), `pos_term`, `neg_term` (the two loss terms), `neg_per_sample`.
    """
    return _head_loss("mlcd", features, centers, labels, key=key, scale=scale, margin=margin,
                      margin_type=margin_type, sample_ratio=sample_ratio, mesh=mesh,
                      num_classes=num_classes)


def unicom_loss(features: jax.Array, centers: jax.Array, labels: jax.Array, *, key: jax.Array,
                scale: float = 32.0, margin: float = 0.3, margin_type: str = "arcface",
                sample_ratio: float = 0.1, mesh: Mesh | None = None,
                num_classes: int | None = None) -> tuple[jax.Array, Metrics]:
    """Single-label baseline (UNICOM / Partial FC): softmax cross-entropy over the margin-adjusted
    positive (the first label; `labels` may be (B,) or (B, l)) and the sampled negatives.

    Arguments as `mlcd_loss`. Metrics: `pos_cos`, `neg_cos`, `pos_logit`, `log_partition`
    (loss = log_partition − pos_logit per sample), `neg_per_sample`.
    """
    return _head_loss("unicom", features, centers, labels, key=key, scale=scale, margin=margin,
                      margin_type=margin_type, sample_ratio=sample_ratio, mesh=mesh,
                      num_classes=num_classes)
