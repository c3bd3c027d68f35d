"""MLCD and single-label (UNICOM / Partial FC) losses, as pure functions of cosines and logits.

Per sample, with P the positive classes and N' the sampled negatives (DESIGN.md):

    MLCD:    log(1 + sum_{i in P} exp(-p_i)) + log(1 + sum_{j in N'} exp(n_j))
    UNICOM:  log(exp(p) + sum_{j in N'} exp(n_j)) - p

The negative sums span the devices that hold the class centers: each device reduces its own drawn
negatives to one log-sum-exp per sample, and `merge_log_sum_exps` combines those with a pmax and a
psum of one number per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mlcd_jax.config.schema import MARGIN_GRADS, MARGIN_TYPES


def positive_logits(cos: jax.Array, *, scale: float, margin: float, margin_type: str,
                    margin_grad: str = "straight_through") -> jax.Array:
    """Margin-adjusted positive logits: s·cos(arccos(c) + m) (ArcFace) or s·(c − m) (CosFace).

    `margin_grad` (ArcFace only; CosFace's gradient is s either way): "straight_through" gives the
    value s·cos(θ + m) the gradient of s·cos θ, as the authors' Partial FC code does (it applies the
    margin under no_grad); "exact" differentiates cos(θ + m), whose gradient turns round once
    θ > π − m and pushes such a positive further away.
    """
    if margin_grad not in MARGIN_GRADS:
        raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
    c = jnp.clip(cos, -1.0, 1.0)
    if margin_type == "arcface":
        # cos(θ + m) = c·cos m − sin θ·sin m with sin θ = sqrt(1 − c²) ≥ 0 for θ ∈ [0, π]. The inner
        # `where` keeps the gradient finite at c = ±1, where d/dc sqrt(1 − c²) is infinite.
        one_minus_c2 = 1.0 - c * c
        positive = one_minus_c2 > 0
        sin = jnp.where(positive, jnp.sqrt(jnp.where(positive, one_minus_c2, 1.0)), 0.0)
        margined = c * jnp.cos(margin) - sin * jnp.sin(margin)
        if margin_grad == "straight_through":
            margined = c + jax.lax.stop_gradient(margined - c)
        return scale * margined
    if margin_type == "cosface":
        return scale * (c - margin)
    raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}")


def log_sum_exp(logits: jax.Array, mask: jax.Array, extra: jax.Array | float,
                axes: Sequence[str] = ()) -> jax.Array:
    """log(exp(extra) + Σ_j mask_j·exp(logits_j)) over the last axis and over the mesh `axes`.

    `extra` (one finite logit per row, the same on every device) keeps the result finite and the
    gradient NaN-free even when a row has no unmasked logit anywhere.
    """
    extra = jnp.broadcast_to(jnp.asarray(extra, logits.dtype), logits.shape[:-1])
    masked = jnp.where(mask, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1))
    if axes:
        row_max = jax.lax.pmax(row_max, tuple(axes))
    shift = jnp.maximum(row_max, jax.lax.stop_gradient(extra))
    total = jnp.sum(jnp.exp(masked - shift[..., None]), axis=-1)
    if axes:
        total = jax.lax.psum(total, tuple(axes))
    return shift + jnp.log(total + jnp.exp(extra - shift))


def merge_log_sum_exps(lse: jax.Array, extra: jax.Array | float,
                       axes: Sequence[str] = ()) -> jax.Array:
    """log(exp(extra) + Σ_shards exp(lse)): per-shard log-sum-exps (−inf where a shard has no
    term) merged over the mesh `axes`, with one extra logit per row."""
    return log_sum_exp(lse[..., None], jnp.isfinite(lse)[..., None], extra, axes)


def mlcd_terms(pos_logits: jax.Array, pos_mask: jax.Array, neg_lse: jax.Array,
               axes: Sequence[str] = ()) -> tuple[jax.Array, jax.Array]:
    """Per-sample positive term log(1 + Σ exp(−p)) and negative term log(1 + Σ exp(n)), the
    negatives given as this shard's log Σ exp(n) per sample."""
    pos_term = log_sum_exp(-pos_logits, pos_mask, 0.0)
    neg_term = merge_log_sum_exps(neg_lse, 0.0, axes)
    return pos_term, neg_term


def unicom_terms(pos_logit: jax.Array, neg_lse: jax.Array,
                 axes: Sequence[str] = ()) -> tuple[jax.Array, jax.Array]:
    """Per-sample log-partition log(exp(p) + Σ exp(n)) and the loss log_partition − p, the
    negatives given as this shard's log Σ exp(n) per sample."""
    log_partition = merge_log_sum_exps(neg_lse, pos_logit, axes)
    return log_partition, log_partition - pos_logit
