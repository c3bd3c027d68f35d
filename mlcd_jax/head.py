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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mlcd_jax import config as config_lib, losses, mesh as mesh_lib

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


# The negatives are scored in chunks of classes so that no B × r·K_local logits are ever held:
# each chunk is at most this many logits (4 MiB in float32), and at least _MIN_CHUNK classes.
# (bench/head.py --chunk: on CPU at B = 256, K = 1M, r = 0.1, chunks of 4k–100k classes ran
# within 11 % of each other, 4k the fastest.)
_LOGITS_PER_CHUNK = 1 << 20
_MIN_CHUNK = 128


def _dot(a, b, dtype):
    """a @ b with inputs in `dtype` (bf16 runs at the accelerator's matmul peak) and float32
    accumulation and result."""
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _chunk_scores(emb, centers, idx, valid, pos_slot, c, dtype):
    """Chunk c of the drawn classes: normalised rows w (with 1/|x| and |x|², which the backward
    pass needs), cos(emb, w) (the matmul in `dtype`), and the mask of real negatives (not padding,
    not the sample's own positive)."""
    rows = centers[idx[c]].astype(jnp.float32)                            # (chunk, D)
    sq = jnp.sum(rows * rows, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.maximum(sq, 1e-24))
    w = rows * inv
    cos = _dot(emb, w.T, dtype)                                           # (B, chunk)
    size = idx.shape[1]
    col = pos_slot - c * size                                             # positive's column here
    col = jnp.where((col >= 0) & (col < size), col, size)                 # size = not in this chunk
    is_pos = jnp.zeros(cos.shape, bool).at[jnp.arange(cos.shape[0])[:, None], col].set(
        True, mode="drop")
    mask = valid[c][None, :] & ~is_pos
    return w, inv, sq, cos, mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _negatives(emb, centers, idx, valid, pos_slot, scale, dtype):
    """Per sample, log Σ exp(s·cos) over this shard's drawn negatives (−inf if none), with the sum
    and count of those cosines (for metrics; no gradient).

    emb (B, D) normalised; centers (K_local, D) raw; idx, valid (chunks, chunk) drawn local rows;
    pos_slot (B, l) each positive's position in the flattened draw (m, the number drawn, if it
    was not drawn here: a padding column or none); dtype: of the matmuls' inputs.
    The backward pass recomputes each chunk's logits from the per-sample log-sum-exp, so memory
    holds O(B × chunk) logits, never B × r·K_local.
    """
    return _negatives_fwd(emb, centers, idx, valid, pos_slot, scale, dtype)[0]


def _negatives_fwd(emb, centers, idx, valid, pos_slot, scale, dtype):
    def step(c, carry):  # online log-sum-exp: both running sums rescaled to the larger max
        top, total, cos_sum, count = carry
        _, _, _, cos, mask = _chunk_scores(emb, centers, idx, valid, pos_slot, c, dtype)
        logits = jnp.where(mask, scale * cos, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
        total = (jnp.where(jnp.isfinite(top), total * jnp.exp(top - shift), 0.0)
                 + jnp.sum(jnp.exp(logits - shift[:, None]), axis=-1))
        return (new_top, total, cos_sum + jnp.sum(jnp.where(mask, cos, 0.0)),
                count + jnp.sum(mask, dtype=jnp.float32))

    # *_like(emb) gives the carry emb's device-varying type inside shard_map.
    per_sample, scalar = jnp.zeros_like(emb[:, 0]), jnp.zeros_like(emb[0, 0])
    init = (per_sample - jnp.inf, per_sample, scalar, scalar)
    top, total, cos_sum, count = jax.lax.fori_loop(0, idx.shape[0], step, init)
    lse = jnp.where(jnp.isfinite(top), top, 0.0) + jnp.log(total)  # log 0 = −inf: no negatives
    return (lse, cos_sum, count), (emb, centers, idx, valid, pos_slot, lse)


def _negatives_bwd(scale, dtype, residuals, cotangents):
    emb, centers, idx, valid, pos_slot, lse = residuals
    g = cotangents[0]                                                     # d loss / d lse, (B,)

    def step(c, carry):
        d_emb, d_centers = carry
        w, inv, sq, cos, mask = _chunk_scores(emb, centers, idx, valid, pos_slot, c, dtype)
        # d lse / d cos_j = s · softmax_j; masked entries (and rows with lse = −inf) get 0.
        d_cos = jnp.where(mask, scale * jnp.exp(scale * cos - lse[:, None]), 0.0) * g[:, None]
        d_w = _dot(d_cos.T, emb, dtype)                                   # (chunk, D)
        # Through w = x / |x|: d x = (d w − w (w · d w)) / |x| (no projection where |x| is clamped).
        d_rows = inv * (d_w - jnp.where(sq > 1e-24, w * jnp.sum(w * d_w, -1, keepdims=True), 0.0))
        d_rows = jnp.where(valid[c][:, None], d_rows, 0.0)
        return d_emb + _dot(d_cos, w, dtype), d_centers.at[idx[c]].add(d_rows)

    init = (jnp.zeros_like(emb), jnp.zeros_like(centers, jnp.float32))
    d_emb, d_centers = jax.lax.fori_loop(0, idx.shape[0], step, init)
    return d_emb, d_centers.astype(centers.dtype), None, None, None


_negatives.defvjp(_negatives_fwd, _negatives_bwd)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """How the head scores a batch (config section `head`; the loss in DESIGN.md)."""
    loss: str = "mlcd"             # "mlcd" (multi-label) or "unicom" (single label, softmax)
    scale: float = 32.0            # s
    margin: float = 0.3            # m
    margin_type: str = "arcface"   # s·cos(θ + m), or "cosface": s·(cos θ − m)
    margin_grad: str = "straight_through"  # ArcFace's gradient: as s·cos θ (the authors' Partial
                                   # FC), or "exact" (turns round past θ = π − m)
    sample_ratio: float = 0.1      # r: each shard draws ceil(r · K_local) negatives; 1 = all, exact
    num_classes: int | None = None # K when the centers carry padding rows past K
    chunk: int | None = None       # classes scored at a time per shard (None: automatic)
    matmul_dtype: str = "float32"  # inputs of the negatives' matmuls ("bfloat16": float32
                                   # accumulation; the positives stay float32)

    def __post_init__(self):
        if self.loss not in config_lib.LOSSES:
            raise ValueError(f"head loss must be one of {config_lib.LOSSES}, got {self.loss!r}")
        if self.margin_type not in losses.MARGIN_TYPES:
            raise ValueError(f"margin_type must be one of {losses.MARGIN_TYPES}, got "
                             f"{self.margin_type!r}")
        if self.margin_grad not in losses.MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {losses.MARGIN_GRADS}, got "
                             f"{self.margin_grad!r}")
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {self.sample_ratio}")
        if self.matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"matmul_dtype must be 'float32' or 'bfloat16', got "
                             f"{self.matmul_dtype!r}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk (classes scored at a time) must be ≥ 1 or None (automatic), "
                             f"got {self.chunk}")

    @classmethod
    def from_config(cls, c) -> HeadConfig:
        """From a config's `head` section (its `lr_mult` belongs to the optimizer); the matmuls
        run in the model's compute dtype unless head.matmul_dtype says otherwise."""
        head = c.head
        matmul = head.matmul_dtype or ("float32" if c.model.dtype == "float32" else "bfloat16")
        return cls(loss=head.loss, scale=float(head.scale), margin=float(head.margin),
                   margin_type=head.margin_type, margin_grad=head.margin_grad,
                   sample_ratio=float(head.sample_ratio),
                   num_classes=head.num_classes, chunk=head.chunk or None, matmul_dtype=matmul)


def _positive_cosines(emb, centers, labels, offset, psum):
    """cos(e, w_y) of every label, computed by the shard that owns class y (the others add 0);
    with, per label, whether this shard owns it and its local row."""
    num_local = centers.shape[0]
    local = labels - offset                                               # (B, l)
    mine = (labels >= 0) & (local >= 0) & (local < num_local)
    local = jnp.clip(local, 0, num_local - 1)
    pos_rows = _normalize(centers[local])                                 # (B, l, D)
    return psum(jnp.where(mine, jnp.einsum("bld,bd->bl", pos_rows, emb), 0.0)), mine, local


def _draw(key, shard, num_local, num_valid, sample_ratio, mine, local):
    """This shard's drawn local rows, whether each is a real class, and each label's position in
    the draw (m, the number drawn, where it was not drawn here), so positives can be left out."""
    idx, valid = _draw_local_classes(key, shard, num_local, num_valid, sample_ratio)
    m = idx.shape[0]
    slot = jnp.full((num_local,), m, jnp.int32).at[idx].set(jnp.arange(m, dtype=jnp.int32))
    return idx, valid, jnp.where(mine, slot[local], m)


def _chunk_layout(idx, valid, chunk, batch):
    """The drawn rows as (chunks, size): even chunks of at most `chunk` classes (default: as many
    as keep batch × size ≤ 2^20 logits, at least 128), so the last one is barely padded."""
    m = idx.shape[0]
    num_chunks = -(-m // (chunk or max(_MIN_CHUNK, _LOGITS_PER_CHUNK // batch)))
    size = -(-m // num_chunks)
    pad = num_chunks * size - m
    return jnp.pad(idx, (0, pad)).reshape(-1, size), jnp.pad(valid, (0, pad)).reshape(-1, size)


def _loss_terms(cfg, pos_cos, pos_mask, neg_lse, class_axes):
    """Per-sample loss and the mean of its terms, from the positives' cosines and this shard's
    negative log-sum-exps."""
    pos_logits = losses.positive_logits(pos_cos, scale=cfg.scale, margin=cfg.margin,
                                        margin_type=cfg.margin_type,
                                        margin_grad=cfg.margin_grad)
    if cfg.loss == "mlcd":
        pos_term, neg_term = losses.mlcd_terms(pos_logits, pos_mask, neg_lse, class_axes)
        return pos_term + neg_term, {"pos_term": jnp.mean(pos_term), "neg_term": jnp.mean(neg_term)}
    log_partition, per_sample = losses.unicom_terms(pos_logits[:, 0], neg_lse, class_axes)
    return per_sample, {"pos_logit": jnp.mean(pos_logits[:, 0]),
                        "log_partition": jnp.mean(log_partition)}


def _shard_loss(features, centers, labels, key, *, cfg: HeadConfig, num_classes: int,
                class_axes: tuple[str, ...],
                batch_axes: tuple[str, ...]) -> tuple[jax.Array, Metrics]:
    """Loss on one shard of centers (the body of the shard_map; also the whole job for
    mesh=None)."""
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

    pos_cos, mine, local = _positive_cosines(emb, centers, labels, offset, psum)
    # Sampled negatives of this shard, minus each sample's own positives, reduced to one
    # log-sum-exp per sample in chunks of classes (logits recomputed in the backward pass).
    idx, valid, pos_slot = _draw(key, shard, num_local, num_valid, cfg.sample_ratio, mine, local)
    idx, valid = _chunk_layout(idx, valid, cfg.chunk, labels.shape[0])
    neg_lse, neg_cos_sum, num_neg = _negatives(emb, centers, idx, valid, pos_slot, cfg.scale,
                                               jnp.dtype(cfg.matmul_dtype))
    pos_mask = labels >= 0
    per_sample, terms = _loss_terms(cfg, pos_cos, pos_mask, neg_lse, class_axes)

    num_neg = psum(num_neg)
    metrics = {
        "pos_cos": jnp.sum(jnp.where(pos_mask, pos_cos, 0.0)) / jnp.maximum(jnp.sum(pos_mask), 1),
        "neg_cos": psum(neg_cos_sum) / jnp.maximum(num_neg, 1.0),
        "neg_per_sample": num_neg / labels.shape[0],
        **terms,
    }
    return jnp.mean(per_sample), jax.tree.map(jax.lax.stop_gradient, metrics)


def _check_args(features, centers, labels, *, num_classes, mesh):
    if features.ndim != 2 or centers.ndim != 2:
        raise ValueError(f"features must be (B, D) and centers (K, D); got features "
                         f"{features.shape}, centers {centers.shape}")
    if features.shape[1] != centers.shape[1]:
        raise ValueError(f"features have D = {features.shape[1]} but centers have D = "
                         f"{centers.shape[1]}; the head's embedding width must match the encoder's")
    if labels.ndim != 2 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be (B, l) with B = {features.shape[0]} (as features); got "
                         f"{labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids (-1 = padding); got dtype "
                         f"{labels.dtype}")
    if not 0 < num_classes <= centers.shape[0]:
        raise ValueError(f"num_classes = {num_classes} must be in [1, centers.shape[0] = "
                         f"{centers.shape[0]}] (rows beyond num_classes are padding)")
    if mesh is not None and features.shape[0] % mesh_lib.num_batch_shards(mesh):
        raise ValueError(f"global batch {features.shape[0]} is not divisible by the "
                         f"{mesh_lib.num_batch_shards(mesh)} batch shards of mesh axes "
                         f"{mesh_lib.batch_axes(mesh)}; change the batch size or the mesh")


def loss(features: jax.Array, centers: jax.Array, labels: jax.Array, *, key: jax.Array,
         cfg: HeadConfig = HeadConfig(), mesh: Mesh | None = None) -> tuple[jax.Array, Metrics]:
    """The head's loss (`cfg.loss`: MLCD or UNICOM), mean over the global batch.

    Args:
      features: (B, D) embeddings, any float dtype; L2-normalised here, computed in float32.
      centers: (K, D) class centers; under `mesh`, sharded along K over every device.
      labels: (B, l) int class ids, most similar first; -1 pads a shorter list. UNICOM uses the
        first (and takes (B,) too).
      key: PRNG key of this step (fold the step in before calling); each shard folds its index.
      cfg: scale, margin, sampling ratio, chunking (`HeadConfig`). The loss and gradients do not
        depend on `cfg.chunk`; memory and speed do.
      mesh: None for one device; else features/labels are split over its batch axes.

    Returns:
      (loss, metrics): float32 scalar loss; metrics `pos_cos`, `neg_cos` (mean cosine of positives
      and of sampled negatives), `neg_per_sample`, and the terms: `pos_term`, `neg_term` (MLCD) or
      `pos_logit`, `log_partition` (UNICOM: loss = log_partition − pos_logit per sample).
    """
    features, centers, labels = jnp.asarray(features), jnp.asarray(centers), jnp.asarray(labels)
    if cfg.loss == "unicom":  # only the first label counts
        labels = labels.reshape(labels.shape[0], -1)[:, :1]
    num_classes = centers.shape[0] if cfg.num_classes is None else int(cfg.num_classes)
    _check_args(features, centers, labels, num_classes=num_classes, mesh=mesh)
    labels = labels.astype(jnp.int32)
    if mesh is None:
        return _shard_loss(features, centers, labels, key, cfg=cfg, num_classes=num_classes,
                           class_axes=(), batch_axes=())

    padded = mesh_lib.padded_num_classes(centers.shape[0], mesh.size)
    if padded != centers.shape[0]:
        centers = jnp.pad(centers, ((0, padded - centers.shape[0]), (0, 0)))
    batch = mesh_lib.batch_spec(mesh)
    body = functools.partial(_shard_loss, cfg=cfg, num_classes=num_classes,
                             class_axes=tuple(mesh.axis_names),
                             batch_axes=mesh_lib.batch_axes(mesh))
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(batch, mesh_lib.class_spec(mesh), batch, P()),
        out_specs=(P(), P()),
    )(features, centers, labels, key)


def mlcd_loss(features, centers, labels, *, key, mesh=None, **options) -> tuple[jax.Array, Metrics]:
    """`loss` with `HeadConfig(loss="mlcd", **options)`: the multi-label loss."""
    return loss(features, centers, labels, key=key, mesh=mesh, cfg=HeadConfig("mlcd", **options))


def unicom_loss(features, centers, labels, *, key, mesh=None,
                **options) -> tuple[jax.Array, Metrics]:
    """`loss` with `HeadConfig(loss="unicom", **options)`: the single-label baseline (UNICOM /
    Partial FC), softmax cross-entropy over the margin-adjusted first label and the negatives."""
    return loss(features, centers, labels, key=key, mesh=mesh, cfg=HeadConfig("unicom", **options))
