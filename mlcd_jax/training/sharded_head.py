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

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mlcd_jax.config.schema import Head
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import losses

Metrics = dict[str, jax.Array]


def num_sampled(num_local: int, sample_ratio: float) -> int:
    """Negatives drawn per shard: ceil(r · K_local), at least 1."""
    return max(1, math.ceil(sample_ratio * num_local))


def draw_size(num_local: int, sample_ratio: float, negatives: str, num_positives: int) -> int:
    """Slots of one shard's draw, a static bound. "uniform": m = ceil(r·K_local). "batch": the
    batch's positives (at most `num_positives` = B·l of the global batch, all possibly on this
    shard) may alone exceed m, and are then all kept, so the bound is min(K_local, max(m, B·l));
    slots past what a step uses are masked, and the scoring loop stops at the last used chunk."""
    m = num_sampled(num_local, sample_ratio)
    if negatives == "batch" and m < num_local:
        return min(num_local, max(m, num_positives))
    return min(m, num_local)


def _draw_local_classes(key: jax.Array, shard: jax.Array, num_local: int, num_valid: jax.Array,
                        sample_ratio: float, batch_rows: jax.Array | None = None,
                        size: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Local row indices drawn on one shard (`size` slots), whether each slot is a real class in
    this step's draw, and how many slots are used.

    Distinct indices: the top-m of i.i.d. uniform scores is a uniform m-subset. Padding rows score
    below every real row, so they are drawn only when the shard has fewer than m real rows (and are
    then masked out). r = 1 takes every row, with no randomness. With `batch_rows` (K_local,)
    bool, the batch's positives on this shard (Partial FC v2, insightface
    recognition/arcface_torch/partial_fc_v2.py `sample`): they score above every other row, so
    the draw keeps them all and fills up to m at random; when they alone exceed m, only they are
    used.
    """
    m = num_sampled(num_local, sample_ratio)
    size = min(m, num_local) if size is None else size
    if m >= num_local:
        idx = jnp.arange(num_local, dtype=jnp.int32)
        return idx, idx < num_valid, jnp.int32(num_local)
    scores = jax.random.uniform(jax.random.fold_in(key, shard), (num_local,))
    used = jnp.int32(m)
    if batch_rows is not None:
        scores = jnp.where(batch_rows, 2.0, scores)
        used = jnp.maximum(used, jnp.sum(batch_rows, dtype=jnp.int32))
    scores = jnp.where(jnp.arange(num_local) < num_valid, scores, -1.0)
    _, idx = jax.lax.top_k(scores, size)
    idx = idx.astype(jnp.int32)
    return idx, (idx < num_valid) & (jnp.arange(size) < used), used


def _owned_rows(labels: jax.Array, offset, num_local: int) -> jax.Array:
    """(K_local,) bool: the rows of this shard that are some sample's positive."""
    local = labels - offset
    mine = (labels >= 0) & (local >= 0) & (local < num_local)
    return jnp.zeros((num_local,), bool).at[jnp.where(mine, local, num_local)].set(
        True, mode="drop")


def sample_negative_classes(key: jax.Array, num_classes: int, *, num_shards: int = 1,
                            sample_ratio: float = 0.1, negatives: str = "uniform",
                            labels: jax.Array | None = None) -> jax.Array:
    """The global class ids that each shard draws for `key`: (num_shards, slots) int32, -1 = a
    padding row or an unused slot. `negatives="batch"` needs the global batch's `labels` (B, l)
    (-1 padding), whose classes it keeps. The same draw the head makes inside the sharded loss (for
    analysis and tests; a multi_softmax column's draw uses that column's labels and key)."""
    num_local = mesh_lib.padded_num_classes(num_classes, num_shards) // num_shards
    if negatives == "batch":
        labels = jnp.asarray(labels, jnp.int32)
    size = draw_size(num_local, sample_ratio, negatives, 0 if labels is None else labels.size)

    def one(shard):
        num_valid = jnp.clip(num_classes - shard * num_local, 0, num_local)
        rows = (None if negatives != "batch"
                else _owned_rows(labels, shard * num_local, num_local))
        idx, valid, _ = _draw_local_classes(key, shard, num_local, num_valid, sample_ratio, rows,
                                            size)
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


def _chunk_scores(emb, centers, idx, valid, pos_slot, c, dtype, threshold):
    """Chunk c of the drawn classes: normalised rows w (with 1/|x| and |x|², which the backward
    pass needs), cos(emb, w) (the matmul in `dtype`), the mask of real negatives (not padding,
    not the sample's own positive), and where a negative's cosine is above `threshold` (it then
    counts as cosine 0 with no gradient: insightface's interclass filtering, a likely duplicate of
    the positive)."""
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
    filtered = (cos > threshold) if threshold < 1.0 else jnp.zeros(cos.shape, bool)
    return w, inv, sq, jnp.where(filtered, 0.0, cos), mask, filtered


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _negatives(emb, centers, idx, valid, pos_slot, num_chunks, scale, dtype, threshold):
    """Per sample, log Σ exp(s·cos) over this shard's drawn negatives (−inf if none), with the sum
    and count of those cosines (for metrics; no gradient).

    emb (B, D) normalised; centers (K_local, D) raw; idx, valid (chunks, chunk) drawn local rows;
    pos_slot (B, l) each positive's position in the flattened draw (past the last slot if it was
    not drawn here); num_chunks: the chunks this step uses (the rest are all masked, not scored);
    dtype: of the matmuls' inputs; threshold: the negative filter's cosine (≥ 1: off).
    The backward pass recomputes each chunk's logits from the per-sample log-sum-exp, so memory
    holds O(B × chunk) logits, never B × r·K_local.
    """
    return _negatives_fwd(emb, centers, idx, valid, pos_slot, num_chunks, scale, dtype,
                          threshold)[0]


def _negatives_fwd(emb, centers, idx, valid, pos_slot, num_chunks, scale, dtype, threshold):
    def step(c, carry):  # online log-sum-exp: both running sums rescaled to the larger max
        top, total, cos_sum, count = carry
        _, _, _, cos, mask, _ = _chunk_scores(emb, centers, idx, valid, pos_slot, c, dtype,
                                              threshold)
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
    top, total, cos_sum, count = jax.lax.fori_loop(0, num_chunks, step, init)
    lse = jnp.where(jnp.isfinite(top), top, 0.0) + jnp.log(total)  # log 0 = −inf: no negatives
    return (lse, cos_sum, count), (emb, centers, idx, valid, pos_slot, num_chunks, lse)


def _negatives_bwd(scale, dtype, threshold, residuals, cotangents):
    emb, centers, idx, valid, pos_slot, num_chunks, lse = residuals
    g = cotangents[0]                                                     # d loss / d lse, (B,)

    def step(c, carry):
        d_emb, d_centers = carry
        w, inv, sq, cos, mask, filtered = _chunk_scores(emb, centers, idx, valid, pos_slot, c,
                                                        dtype, threshold)
        # d lse / d cos_j = s · softmax_j; masked and filtered entries (and rows with lse = −inf)
        # get 0.
        d_cos = jnp.where(mask & ~filtered, scale * jnp.exp(scale * cos - lse[:, None]),
                          0.0) * g[:, None]
        d_w = _dot(d_cos.T, emb, dtype)                                   # (chunk, D)
        # Through w = x / |x|: d x = (d w − w (w · d w)) / |x| (no projection where |x| is clamped).
        d_rows = inv * (d_w - jnp.where(sq > 1e-24, w * jnp.sum(w * d_w, -1, keepdims=True), 0.0))
        d_rows = jnp.where(valid[c][:, None], d_rows, 0.0)
        return d_emb + _dot(d_cos, w, dtype), d_centers.at[idx[c]].add(d_rows)

    init = (jnp.zeros_like(emb), jnp.zeros_like(centers, jnp.float32))
    d_emb, d_centers = jax.lax.fori_loop(0, num_chunks, step, init)
    return d_emb, d_centers.astype(centers.dtype), None, None, None, None


_negatives.defvjp(_negatives_fwd, _negatives_bwd)


def _positive_cosines(emb, centers, labels, offset, psum):
    """cos(e, w_y) of every label, computed by the shard that owns class y (the others add 0);
    with, per label, whether this shard owns it and its local row."""
    num_local = centers.shape[0]
    local = labels - offset                                               # (B, l)
    mine = (labels >= 0) & (local >= 0) & (local < num_local)
    local = jnp.clip(local, 0, num_local - 1)
    pos_rows = _normalize(centers[local])                                 # (B, l, D)
    return psum(jnp.where(mine, jnp.einsum("bld,bd->bl", pos_rows, emb), 0.0)), mine, local


def _draw(key, shard, num_local, num_valid, cfg, labels, offset, mine, local):
    """This shard's drawn local rows, whether each slot is a real class of this step's draw, how
    many slots are used, and each label's position in the draw (past the last slot where it was
    not drawn here), so positives can be left out. "batch" keeps every class of `labels`."""
    rows = _owned_rows(labels, offset, num_local) if cfg.negatives == "batch" else None
    size = draw_size(num_local, cfg.sample_ratio, cfg.negatives, labels.size)
    idx, valid, used = _draw_local_classes(key, shard, num_local, num_valid, cfg.sample_ratio,
                                           rows, size)
    slot = jnp.full((num_local,), size, jnp.int32).at[idx].set(jnp.arange(size, dtype=jnp.int32))
    return idx, valid, used, jnp.where(mine, slot[local], size)


def _chunk_layout(idx, valid, used, chunk, batch):
    """The drawn rows as (chunks, size): even chunks of at most `chunk` classes (default: as many
    as keep batch × size ≤ 2^20 logits, at least 128), so the last one is barely padded; and the
    chunks that hold the `used` slots (the scoring loop stops there)."""
    m = idx.shape[0]
    num_chunks = -(-m // (chunk or max(_MIN_CHUNK, _LOGITS_PER_CHUNK // batch)))
    size = -(-m // num_chunks)
    pad = num_chunks * size - m
    return (jnp.pad(idx, (0, pad)).reshape(-1, size), jnp.pad(valid, (0, pad)).reshape(-1, size),
            jnp.minimum((used + size - 1) // size, num_chunks))


def _scored(emb, centers, labels, key, shard, offset, num_valid, cfg, psum):
    """One draw of this shard scored against the batch, for `labels` (B, l) (-1 padding): the
    positives' cosines, each sample's log-sum-exp over this shard's drawn negatives (its own
    positives left out), the negatives' cosine sum and count, and the rows used (drawn or
    positive, for sparse center updates)."""
    num_local = centers.shape[0]
    pos_cos, mine, local = _positive_cosines(emb, centers, labels, offset, psum)
    idx, valid, used, pos_slot = _draw(key, shard, num_local, num_valid, cfg, labels, offset,
                                       mine, local)
    rows_used = (jnp.zeros((num_local,), bool).at[idx].max(valid)
                 | _owned_rows(labels, offset, num_local))
    idx, valid, num_chunks = _chunk_layout(idx, valid, used, cfg.chunk, labels.shape[0])
    neg_lse, neg_cos_sum, num_neg = _negatives(emb, centers, idx, valid, pos_slot, num_chunks,
                                               cfg.scale, jnp.dtype(cfg.matmul_dtype or "float32"),
                                               float(cfg.negative_filter))
    return pos_cos, neg_lse, neg_cos_sum, num_neg, rows_used


def _positive_logits(cfg, pos_cos):
    return losses.positive_logits(pos_cos, scale=cfg.scale, margin=cfg.margin,
                                  margin_type=cfg.margin_type, margin_grad=cfg.margin_grad)


def label_columns(key: jax.Array, labels: jax.Array, columns: int) -> jax.Array:
    """multi_softmax's labels of this step: (B, columns), for each sample `columns` of its l label
    columns drawn at random (its real labels before its -1 padding), as OneVision-Encoder's
    trainer keeps 8 of each sample's top-10 centers per step."""
    columns = columns or labels.shape[1]
    scores = jax.random.uniform(key, labels.shape) + jnp.where(labels >= 0, 0.0, 2.0)
    keep = jnp.argsort(scores, axis=1)[:, :columns]
    return jnp.take_along_axis(labels, keep, axis=1)


def _shard_loss(features, centers, labels, key, *, cfg: Head, num_classes: int,
                class_axes: tuple[str, ...],
                batch_axes: tuple[str, ...]) -> tuple[jax.Array, Metrics, jax.Array]:
    """Loss, metrics and the rows used (drawn or positive) on one shard of centers (the body of
    the shard_map; also the whole job for mesh=None)."""
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
    score = functools.partial(_scored, emb, centers, shard=shard, offset=offset,
                              num_valid=num_valid, cfg=cfg, psum=psum)

    if cfg.loss == "multi_softmax":
        # OneVision-Encoder (training/fused_partial_fc_v2_multi_res.py): a margin-softmax per label
        # column, each column with its own draw (its own batch positives under "batch"), averaged.
        column_key, draw_key = jax.random.split(key)
        columns = label_columns(column_key, labels, cfg.label_columns)
        per_column = [score(columns[:, j:j + 1], jax.random.fold_in(draw_key, j))
                      for j in range(columns.shape[1])]
        pos_cos = jnp.concatenate([p[0] for p in per_column], axis=1)     # (B, C)
        neg_lse = jnp.stack([p[1] for p in per_column], axis=1)           # (B, C)
        neg_cos_sum, num_neg = sum(p[2] for p in per_column), sum(p[3] for p in per_column)
        rows_used = functools.reduce(jnp.logical_or, [p[4] for p in per_column])
        pos_mask = columns >= 0
        pos_logit = _positive_logits(cfg, pos_cos)
        log_partition, per_label = losses.unicom_terms(pos_logit, neg_lse, class_axes)
        weight = pos_mask / jnp.maximum(jnp.sum(pos_mask), 1)
        loss = jnp.sum(jnp.where(pos_mask, per_label, 0.0) * weight)
        terms = {"pos_logit": jnp.sum(jnp.where(pos_mask, pos_logit, 0.0) * weight),
                 "log_partition": jnp.sum(jnp.where(pos_mask, log_partition, 0.0) * weight)}
        num_neg = num_neg / columns.shape[1]  # per sample and column
    else:
        pos_cos, neg_lse, neg_cos_sum, num_neg, rows_used = score(labels, key)
        pos_mask = labels >= 0
        pos_logits = _positive_logits(cfg, pos_cos)
        mean = jnp.mean
        if cfg.skip_unlabelled:  # the mean over the samples with a label
            counted = pos_mask.any(axis=1)
            mean = lambda x: jnp.sum(jnp.where(counted, x, 0.0)) / jnp.maximum(
                jnp.sum(counted), 1)
        if cfg.loss == "mlcd":
            pos_term, neg_term = losses.mlcd_terms(pos_logits, pos_mask, neg_lse, class_axes)
            loss = mean(pos_term + neg_term)
            terms = {"pos_term": mean(pos_term), "neg_term": mean(neg_term)}
        else:
            log_partition, per_sample = losses.unicom_terms(pos_logits[:, 0], neg_lse, class_axes)
            loss = mean(per_sample)
            terms = {"pos_logit": mean(pos_logits[:, 0]), "log_partition": mean(log_partition)}

    num_neg = psum(num_neg)
    metrics = {
        "pos_cos": jnp.sum(jnp.where(pos_mask, pos_cos, 0.0)) / jnp.maximum(jnp.sum(pos_mask), 1),
        "neg_cos": psum(neg_cos_sum) / jnp.maximum(num_neg, 1.0),
        "neg_per_sample": num_neg / labels.shape[0],
        **terms,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics), rows_used


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
         cfg: Head, mesh: Mesh | None = None) -> tuple[jax.Array, Metrics]:
    """The head's loss (`cfg.loss`: MLCD, UNICOM or multi_softmax), mean over the global batch.

    Args:
      features: (B, D) embeddings, any float dtype; L2-normalised here, computed in float32.
      centers: (K, D) class centers; under `mesh`, sharded along K over every device.
      labels: (B, l) int class ids, most similar first; -1 pads a shorter list. UNICOM uses the
        first (and takes (B,) too).
      key: PRNG key of this step (fold the step in before calling); each shard folds its index.
      cfg: scale, margin, sampling ratio, chunking, K (`schema.Head`: the config's `head`
        section). The loss and gradients do not depend on `cfg.chunk`; memory and speed do.
      mesh: None for one device; else features/labels are split over its batch axes.

    Returns:
      (loss, metrics): float32 scalar loss; metrics `pos_cos`, `neg_cos` (mean cosine of positives
      and of sampled negatives), `neg_per_sample` (per sample and label column for
      multi_softmax), and the terms: `pos_term`, `neg_term` (MLCD) or `pos_logit`,
      `log_partition` (UNICOM and multi_softmax: loss = log_partition − pos_logit per label);
      with `cfg.center_update="sparse"` also `rows_used` (K_padded,), 1.0 where a center row was
      drawn or positive this step (sharded as the centers).
    """
    features, centers, labels = jnp.asarray(features), jnp.asarray(centers), jnp.asarray(labels)
    labels = labels.reshape(labels.shape[0], -1)
    if cfg.loss == "unicom":  # only the first label counts
        labels = labels[:, :1]
    num_classes = int(cfg.num_classes)
    _check_args(features, centers, labels, num_classes=num_classes, mesh=mesh)
    labels = labels.astype(jnp.int32)
    if mesh is None:
        loss, metrics, rows_used = _shard_loss(features, centers, labels, key, cfg=cfg,
                                               num_classes=num_classes, class_axes=(),
                                               batch_axes=())
        return loss, _with_rows_used(cfg, metrics, rows_used)

    padded = mesh_lib.padded_num_classes(centers.shape[0], mesh.size)
    if padded != centers.shape[0]:
        centers = jnp.pad(centers, ((0, padded - centers.shape[0]), (0, 0)))
    batch = mesh_lib.batch_spec(mesh)
    body = functools.partial(_shard_loss, cfg=cfg, num_classes=num_classes,
                             class_axes=tuple(mesh.axis_names),
                             batch_axes=mesh_lib.batch_axes(mesh))
    loss, metrics, rows_used = jax.shard_map(
        body, mesh=mesh,
        in_specs=(batch, mesh_lib.class_spec(mesh), batch, P()),
        out_specs=(P(), P(), P(tuple(mesh.axis_names))),
    )(features, centers, labels, key)
    return loss, _with_rows_used(cfg, metrics, rows_used)


def _with_rows_used(cfg, metrics, rows_used):
    """Sparse center updates need the rows used, (K_padded,) 1.0 / 0.0 laid out as the centers."""
    if cfg.center_update == "sparse":
        metrics = metrics | {"rows_used": rows_used.astype(jnp.float32)}
    return metrics


def _options(loss_name: str, centers, options: dict) -> Head:
    """A head of `options` for a loss used alone (K: the centers' rows unless given; None: the
    field's default)."""
    given = {k: v for k, v in options.items() if v is not None}
    return Head(loss=loss_name, **{"num_classes": centers.shape[0]} | given)


def mlcd_loss(features, centers, labels, *, key, mesh=None, **options) -> tuple[jax.Array, Metrics]:
    """`loss` with `Head(loss="mlcd", **options)`: the multi-label loss."""
    return loss(features, centers, labels, key=key, mesh=mesh,
                cfg=_options("mlcd", centers, options))


def multi_softmax_loss(features, centers, labels, *, key, mesh=None,
                       **options) -> tuple[jax.Array, Metrics]:
    """`loss` with `Head(loss="multi_softmax", **options)`: OneVision-Encoder's form, the mean
    over label columns of a margin-softmax, each column with its own draw."""
    return loss(features, centers, labels, key=key, mesh=mesh,
                cfg=_options("multi_softmax", centers, options))


def unicom_loss(features, centers, labels, *, key, mesh=None,
                **options) -> tuple[jax.Array, Metrics]:
    """`loss` with `Head(loss="unicom", **options)`: the single-label baseline (UNICOM / Partial
    FC), softmax cross-entropy over the margin-adjusted first label and the negatives."""
    return loss(features, centers, labels, key=key, mesh=mesh,
                cfg=_options("unicom", centers, options))
