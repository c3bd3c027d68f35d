"""Image–text contrastive losses for LiT, split over the batch axes of the mesh: CLIP's softmax
loss with a learned temperature, and SigLIP's sigmoid loss with a learned temperature and bias.

Each device holds b = B/n images and texts. It all-gathers the other side's embeddings (B × D is
small) and scores only its own rows against all B columns, a chunk of columns at a time under
`jax.checkpoint`, so a device holds b × chunk logits, never B × B, forward or backward. The sums
of the per-row terms are reduced over the batch axes. `mesh=None` runs the same code on one device.

    CLIP:   L = ½ (mean_i CE(image i → its text) + mean_j CE(text j → its image)),
            logits = exp(t) · cos(x_i, y_j)
    SigLIP: L = −(1/B) Σ_ij log σ(z_ij (exp(t) · cos(x_i, y_j) + b)), z_ii = 1, z_ij = −1
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mlcd_jax.config.schema import CONTRASTIVE
from mlcd_jax.runtime import mesh as mesh_lib


def _normalize(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))


def _column_chunks(columns, chunk):
    """(chunks, size, D): the gathered columns, padded with zero rows to whole chunks; and the
    number of real columns."""
    n = columns.shape[0]
    size = min(chunk or n, n)
    count = -(-n // size)
    padded = jnp.pad(columns, ((0, count * size - n), (0, 0)))
    return padded.reshape(count, size, -1), n


def _row_terms(rows, columns, first, *, kind, scale, bias, chunk):
    """Per local row: CLIP: the log-sum-exp over all columns minus the matching logit; SigLIP:
    −Σ_j log σ(z_ij · logit_ij). `first`: the global index of this device's first row (its
    matching column is first + i)."""
    chunks, n = _column_chunks(columns, chunk)
    size = chunks.shape[1]
    row_ids = first + jnp.arange(rows.shape[0])

    @jax.checkpoint  # the backward pass recomputes a chunk's logits: b × chunk at a time
    def step(carry, c):
        logits = scale * rows @ chunks[c].T + bias                       # (b, size)
        col_ids = c * size + jnp.arange(size)
        real = (col_ids < n)[None, :]
        match = row_ids[:, None] == col_ids[None, :]
        if kind == "clip":
            top, total, positive = carry
            masked = jnp.where(real, logits, -jnp.inf)
            new_top = jnp.maximum(top, jnp.max(masked, -1))
            total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(masked - new_top[:, None]),
                                                            -1)
            return (new_top, total, positive + jnp.sum(jnp.where(match, logits, 0.0), -1)), None
        signs = jnp.where(match, 1.0, -1.0)
        return carry + jnp.sum(jnp.where(real, -jax.nn.log_sigmoid(signs * logits), 0.0), -1), None

    zeros = jnp.zeros_like(rows[:, 0])
    if kind == "clip":
        (top, total, positive), _ = jax.lax.scan(step, (zeros - jnp.inf, zeros, zeros),
                                                 jnp.arange(chunks.shape[0]))
        return top + jnp.log(total) - positive
    return jax.lax.scan(step, zeros, jnp.arange(chunks.shape[0]))[0]


def _shard_loss(images, texts, log_scale, bias, *, kind, chunk, batch_axes):
    scale = jnp.exp(log_scale.astype(jnp.float32))
    bias = bias.astype(jnp.float32) if kind == "siglip" else 0.0
    x, y = _normalize(images), _normalize(texts)
    b = x.shape[0]
    if batch_axes:
        first = jax.lax.axis_index(batch_axes) * b
        all_x = jax.lax.all_gather(x, batch_axes, axis=0, tiled=True)
        all_y = jax.lax.all_gather(y, batch_axes, axis=0, tiled=True)
        total = lambda v: jax.lax.psum(v, batch_axes)
    else:
        first, all_x, all_y, total = 0, x, y, lambda v: v
    count = b * (jax.lax.psum(1, batch_axes) if batch_axes else 1)
    terms = functools.partial(_row_terms, kind=kind, scale=scale, bias=bias, chunk=chunk)
    image_to_text = total(jnp.sum(terms(x, all_y, first)))
    if kind == "siglip":  # every pair once: the image rows against all texts
        return image_to_text / count
    text_to_image = total(jnp.sum(terms(y, all_x, first)))
    return 0.5 * (image_to_text + text_to_image) / count


def loss(images: jax.Array, texts: jax.Array, log_scale: jax.Array, bias: jax.Array | None = None,
         *, kind: str = "clip", chunk: int | None = None, mesh: Mesh | None = None) -> jax.Array:
    """The contrastive loss of paired (B, D) image and text embeddings (row i of each is a pair),
    float32. `log_scale`: the learned log temperature t (logits are exp(t) · cos); `bias`:
    SigLIP's learned bias. `chunk`: columns scored at a time (None: all); the value and gradients
    do not depend on it. Under `mesh`, the rows are split over its batch axes."""
    if kind not in CONTRASTIVE:
        raise ValueError(f"contrastive loss kind must be one of {CONTRASTIVE}, got {kind!r}")
    if images.shape != texts.shape or images.ndim != 2:
        raise ValueError(f"images and texts must be (B, D) of one shape; got {images.shape} and "
                         f"{texts.shape}")
    bias = jnp.zeros(()) if bias is None else bias
    if mesh is None:
        return _shard_loss(images, texts, log_scale, bias, kind=kind, chunk=chunk, batch_axes=())
    axes = mesh_lib.batch_axes(mesh)
    if images.shape[0] % mesh_lib.num_batch_shards(mesh):
        raise ValueError(f"batch {images.shape[0]} is not divisible by the "
                         f"{mesh_lib.num_batch_shards(mesh)} batch shards of the mesh")
    batch = mesh_lib.batch_spec(mesh)
    body = functools.partial(_shard_loss, kind=kind, chunk=chunk, batch_axes=axes)
    return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, P(), P()),
                         out_specs=P())(images, texts, log_scale, bias)
