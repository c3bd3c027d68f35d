"""RICE's Region Transformer layer (Xie et al., "Region-based Cluster Discrimination for Visual
Representation Learning", ICCV 2025, arXiv 2507.20025, §3.2): after the ViT's blocks, each of N
regions of an image gets a class token of its own that attends only to the patch tokens inside the
region's box, every region of every image in one pass.

Here, per image, the N region tokens start as one learned region class embedding and go through
`region_layers` layers of a pre-norm transformer block (the ViT block's parameters and layout)
whose queries are the region tokens and whose keys and values are the region tokens and the final
patch tokens (the ViT's last hidden state without its class token), under an attention bias of 0
where a region may look and −inf elsewhere: a region sees itself and the patches its box overlaps
(a box smaller than a patch still sees the patch it lies in; a padded region, an empty box, sees
only itself and is ignored by the loss). The patch tokens are not changed. The region tokens leave
through the ViT's own post-layernorm and projection, so a region's embedding lives where the
image's does (one projection to export; the image head and the region heads score the same kind of
vector).

Our choices where §3.2 leaves room (said so in docs/regions.md): a patch is inside a box when its
square overlaps the box with positive area; the region token attends to itself (so no softmax
row is empty); no RoPE in the region layer (the patch tokens carry their positions already).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd_jax.models import vit


def patch_mask(boxes: jax.Array, grid_h: int, grid_w: int, patch: int) -> jax.Array:
    """(B, N, grid_h·grid_w) bool: which patches each box [x0, y0, x1, y1] (pixels of the model's
    input image) overlaps with positive area. Patch (r, c) covers [c·p, (c+1)·p) × [r·p,
    (r+1)·p)."""
    boxes = boxes.astype(jnp.float32)
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    cols = jnp.tile(jnp.arange(grid_w, dtype=jnp.float32) * patch, grid_h)
    rows = jnp.repeat(jnp.arange(grid_h, dtype=jnp.float32) * patch, grid_w)
    return (x0 < cols + patch) & (x1 > cols) & (y0 < rows + patch) & (y1 > rows)


def patch_mask_at(boxes: jax.Array, positions: jax.Array, mask: jax.Array,
                  patch: int) -> jax.Array:
    """(B, N, T) bool: `patch_mask` of images at their own sizes (native resolution): which of
    the patches at `positions` (B, T, 2) (row, col) each box overlaps; padding (`mask` False)
    never."""
    boxes = boxes.astype(jnp.float32)
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    rows = positions[:, None, :, 0].astype(jnp.float32) * patch
    cols = positions[:, None, :, 1].astype(jnp.float32) * patch
    return ((x0 < cols + patch) & (x1 > cols) & (y0 < rows + patch) & (y1 > rows)
            & mask[:, None, :])


def attention_bias(boxes: jax.Array, grid_h: int, grid_w: int, patch: int) -> jax.Array:
    """(B, N, N + h·w) float32 attention bias of the region tokens: 0 on the region's own token
    and on the patches its box overlaps, −inf elsewhere (keys: the N region tokens, then the
    patches)."""
    return _bias(patch_mask(boxes, grid_h, grid_w, patch))


def _bias(inside: jax.Array) -> jax.Array:
    b, n = inside.shape[:2]
    own = jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n))
    allowed = jnp.concatenate([own, inside], axis=-1)
    return jnp.where(allowed, 0.0, -jnp.inf).astype(jnp.float32)


class RegionBlock(vit.Block):
    """The ViT block's parameters (layer norms, q/k/v/out, MLP), applied with the region tokens as
    queries and [region tokens, patches] as keys and values, under `bias`."""

    def __call__(self, regions: jax.Array, patches: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, n, w = regions.shape
        t = patches.shape[1]
        flat = lambda x: x.reshape(-1, w)  # dense layers on 2-D (rows, width), as the blocks
        h_regions = self.layer_norm1(flat(regions))
        h_keys = jnp.concatenate([h_regions.reshape(b, n, w),
                                  self.layer_norm1(flat(patches)).reshape(b, t, w)], axis=1)
        split = lambda y, rows: y.reshape(b, rows, cfg.heads, cfg.head_dim)
        q = split(self.q_proj(h_regions), n)
        k = split(self.k_proj(flat(h_keys)), n + t)
        v = split(self.v_proj(flat(h_keys)), n + t)
        impl, _ = vit.attention_implementation(cfg)
        attn = jax.nn.dot_product_attention(q, k, v, bias=bias[:, None].astype(q.dtype),
                                            implementation=impl).reshape(b * n, w)
        x = flat(regions) + self.out_proj(attn)
        x = x + self.fc2(vit.ACTIVATIONS[cfg.act](self.fc1(self.layer_norm2(x))))
        return x.reshape(b, n, w)


class RegionLayers(nnx.Module):
    """`layers` RegionBlocks over a learned region class embedding (see the module's docstring)."""

    def __init__(self, cfg: vit.ViTConfig, layers: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.region_embedding = vit._param(rngs, nnx.initializers.normal(cfg.width ** -0.5),
                                           (cfg.width,), ("embed",))
        self.blocks = nnx.List([RegionBlock(cfg, rngs=rngs) for _ in range(layers)])

    def __call__(self, hidden: jax.Array, boxes: jax.Array,
                 grid: tuple[int, int] | vit.Patches) -> jax.Array:
        """hidden: (B, 1 + h·w, W), the ViT's last hidden state; boxes: (B, N, 4) pixels of its
        input image; `grid` its (h, w), or the `vit.Patches` it ran on (native resolution: each
        patch's position, the padding masked). Returns the region tokens (B, N, W) after the
        layers."""
        patches = hidden[:, 1:]
        b, n = boxes.shape[:2]
        if isinstance(grid, vit.Patches):
            bias = _bias(patch_mask_at(boxes, grid.positions, grid.mask, self.cfg.patch))
        else:
            bias = attention_bias(boxes, *grid, self.cfg.patch)
        regions = jnp.broadcast_to(self.region_embedding[...].astype(hidden.dtype),
                                   (b, n, self.cfg.width))
        for block in self.blocks:
            regions = block(regions, patches, bias)
        return regions


def embed(encoder: vit.ViT, layers: RegionLayers, out: vit.ViTOutput, boxes: jax.Array,
          image_hw: tuple[int, int] | vit.Patches) -> jax.Array:
    """The regions' embeddings (B, N, embed_dim): `layers` over the encoder's output `out` for
    images of `image_hw` pixels (or the `vit.Patches` it ran on), through the encoder's
    post-layernorm and projection (the image embedding's path)."""
    grid = (image_hw if isinstance(image_hw, vit.Patches)
            else tuple(s // encoder.cfg.patch for s in image_hw))
    tokens = layers(out.last_hidden_state, boxes, grid)
    pooled = encoder.post_layernorm(tokens.reshape(-1, tokens.shape[-1]))
    embedded = encoder.projection(pooled) if encoder.projection is not None else pooled
    return embedded.reshape(tokens.shape[:2] + embedded.shape[-1:])


class RegionOutput(NamedTuple):
    last_hidden_state: jax.Array  # as vit.ViTOutput
    pooler_output: jax.Array
    embedding: jax.Array
    region_embedding: jax.Array   # (B, N, embed_dim): each box's region token, embedded


class WithRegions(nnx.Module):
    """An encoder with its Region Transformer layers (a run with region heads, or an exported
    one: `weights.load_region_layers`): `(pixels)` is the encoder's output, `(pixels, boxes)`
    adds each box's region embedding."""

    def __init__(self, encoder: vit.ViT, layers: RegionLayers):
        self.encoder, self.layers = encoder, layers
        self.cfg, self.region_layers = encoder.cfg, len(layers.blocks)

    def __call__(self, pixels: jax.Array, boxes: jax.Array | None = None):
        out = self.encoder(pixels)
        if boxes is None:
            return out
        where = pixels if isinstance(pixels, vit.Patches) else pixels.shape[1:3]
        return RegionOutput(*out, embed(self.encoder, self.layers, out, boxes, where))
