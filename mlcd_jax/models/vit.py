"""Vision Transformers with two position schemes, parameter-compatible with transformers.

* ``pos="rope"``: MLCD's encoder (transformers ``MLCDVisionModel``): no absolute position embedding;
  2D rotary embedding on q and k (rope dim = head_dim/2; angles [row·inv_freq, col·inv_freq], twice,
  half-split rotation; a learned ``class_pos_emb`` gives the class token's angles), exact-erf GELU.
  Any image size that the patch divides works, non-square included.
* ``pos="learned"``: CLIP's encoder (``CLIPVisionModel``): learned absolute position embedding for
  one image size, quick-GELU.

Both: bias-free conv patch embedding, learned class token, ``pre_layrnorm`` over all tokens,
pre-norm blocks with separate q/k/v/out projections, ``post_layernorm`` on the class token (the
pooled output), and an optional bias-free projection to the embedding width that feeds the MLCD
head.

Blocks are stored stacked (a leading ``layers`` axis on every block parameter) and run either by
``lax.scan`` (``scan=True``: one block compiled, for deep models) or unrolled; ``remat=True``
recomputes each block's activations in the backward pass, all of them or what ``remat_policy``
does not keep. Compute runs in ``dtype`` (bf16 for training) with float32 parameters; RoPE (its
cos/sin made once per forward, not per layer) and the softmax run in float32.

Native resolution (big_vision's NaFlex, SigLIP 2): the model also takes ``Patches``, images at
their own sizes as a fixed number of patch rows with each patch's (row, col) and a mask. The patch
embedding is the conv kernel reshaped to a dense layer; RoPE's angles come from each token's own
position; learned positions are the table resized to each image's grid (bilinear, antialiased
when shrinking, as ``jax.image.resize``); attention ignores the padding (sequence lengths: the
real tokens come first); the class token pools. With a full grid it computes what the pixel path
does, and padding changes no real token. The parameters are the same in both.

Attention is ``jax.nn.dot_product_attention``: cuDNN's fused (flash) kernel on GPUs in bf16/fp16,
XLA elsewhere (``attention="auto"``). The cuDNN path pads the token axis to a multiple of
``CUDNN_TOKEN_MULTIPLE`` (ViT-B/16 has 197 tokens) and masks the padding out by sequence lengths;
``attention_pad`` runs the same padding through XLA, which is how CPU tests check that path.
Every parameter carries ``logical_axes`` metadata (see ``mlcd_jax.runtime.mesh.param_shardings``)
so it can be FSDP-sharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd_jax.runtime import backend
from mlcd_jax.runtime.errors import UserError

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
POSITIONS = ("rope", "learned")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("auto", "xla", "cudnn")
CUDNN_TOKEN_MULTIPLE = 64  # the token axis cuDNN's fused attention is given (padded, masked)
# What a rematerialised block keeps for the backward pass (the rest is recomputed). B/16 at batch
# 32, bf16, scanned, XLA:CPU's compiled temporaries: no remat 9.2 GiB, "dots" 2.6, "full" 1.1.
REMAT_POLICIES = {
    "full": None,                 # nothing: every activation recomputed (the least memory)
    "dots": "dots_with_no_batch_dims_saveable",  # the dense layers' outputs: recompute only
                                  # norms, GELU and attention (attention scores are never kept)
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int
    image_size: int | tuple[int, int] = 224  # learned positions are made for this size
    pos: str = "rope"
    act: str = "gelu"
    rope_theta: float = 10000.0
    embed_dim: int | None = None             # bias-free projection width → embed_dim (None: none)
    ln_eps: float = 1e-5
    channels: int = 3
    dtype: str = "float32"                   # compute dtype; parameters are always float32
    scan: bool = False
    remat: bool = False
    remat_policy: str = "full"               # with remat: one of REMAT_POLICIES
    attention: str = "auto"                  # one of ATTENTION ("auto": cuDNN on GPU in bf16/fp16)
    attention_pad: int = 0                   # pad tokens to a multiple of this, masked (0: what
                                             # the implementation needs: 64 for cuDNN, 1 for XLA)

    def __post_init__(self):
        for name in ("width", "depth", "heads", "mlp_dim", "patch", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if not all(isinstance(s, int) and s >= 1 for s in self.image_hw):
            raise UserError(f"ViTConfig.image_size must be positive, got {self.image_size!r}")
        if self.embed_dim is not None and not (isinstance(self.embed_dim, int)
                                               and self.embed_dim >= 1):
            raise UserError(f"ViTConfig.embed_dim must be None or a positive integer, got "
                            f"{self.embed_dim!r}")
        for name in ("ln_eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"ViTConfig.{name} must be a finite positive number, "
                                f"got {value!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"ViTConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.pos not in POSITIONS:
            raise UserError(f"ViTConfig.pos must be one of {POSITIONS}, got {self.pos!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(f"ViTConfig.remat_policy must be one of {tuple(REMAT_POLICIES)}, "
                            f"got {self.remat_policy!r}")
        if self.attention not in ATTENTION:
            raise UserError(f"ViTConfig.attention must be one of {ATTENTION}, "
                            f"got {self.attention!r}")
        if not isinstance(self.attention_pad, int) or self.attention_pad < 0:
            raise UserError(f"ViTConfig.attention_pad must be an integer ≥ 0, "
                            f"got {self.attention_pad!r}")
        if self.act not in ACTIVATIONS:
            raise UserError(f"ViTConfig.act must be one of {tuple(ACTIVATIONS)}, got {self.act!r}")
        if self.width % self.heads:
            raise UserError(f"ViTConfig.width {self.width} is not divisible by heads {self.heads}")
        if self.pos == "rope" and self.head_dim % 4:
            raise UserError(f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        h, w = self.image_hw
        if h % self.patch or w % self.patch:
            raise UserError(f"ViTConfig.image_size {self.image_size} is not divisible by patch "
                            f"{self.patch}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else tuple(s)


# Named sizes. MLCD's released B/32 and L/14 are CLIP-style; the v2 bigG/14 models use RoPE.
SIZES = {
    "B/32": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=32),
    "B/16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=16),
    "L/14": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch=14),
    "L/14@336": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch=14, image_size=336),
    "H/14": dict(width=1280, depth=32, heads=16, mlp_dim=5120, patch=14),
    "bigG/14": dict(width=1664, depth=48, heads=16, mlp_dim=8192, patch=14),
    # For tests and the CPU demo.
    "tiny": dict(width=64, depth=2, heads=4, mlp_dim=128, patch=8, image_size=32),
    "demo": dict(width=64, depth=4, heads=4, mlp_dim=256, patch=4, image_size=32),
    "micro": dict(width=32, depth=2, heads=2, mlp_dim=64, patch=4, image_size=16),
}


def vit_config(name: str, **overrides) -> ViTConfig:
    """A named size (``SIZES``) with any field overridden, e.g.
    ``vit_config("B/16", pos="learned")``."""
    if name not in SIZES:
        raise UserError(f"unknown ViT size {name!r}; known sizes: {', '.join(SIZES)}")
    return ViTConfig(**(SIZES[name] | overrides))


class Patches(NamedTuple):
    """Images at their own sizes (`data.transforms.patchify` makes each row): T patch rows per
    image, the real ones first, then padding."""
    patches: jax.Array    # (B, T, p·p·C): normalised pixels, each patch's rows, cols, channels
    positions: jax.Array  # (B, T, 2) int32: each patch's (row, col) in its image's grid
    mask: jax.Array       # (B, T) bool: the real patches (a prefix of each row)


class ViTOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, 1 + h·w, width), after the last block (as transformers);
                                  # for Patches (B, 1 + T, width), zero on the padding
    pooler_output: jax.Array      # (B, width): post_layernorm of the class token
    embedding: jax.Array          # (B, embed_dim): the projection of pooler_output (or it, if none)


SHAPE_FIELDS = ("width", "depth", "heads", "mlp_dim", "patch")  # model.size, field by field


def from_config(c) -> ViTConfig:
    """The ViT of a trainer config (its `model` section; `data.image_size` where model.image_size
    is 0)."""
    m = c.model
    overrides = dict(pos=m.pos, embed_dim=m.embed_dim or None, dtype=m.dtype, scan=m.scan,
                     remat=m.remat, remat_policy=m.remat_policy, attention=m.attention,
                     attention_pad=m.attention_pad, image_size=m.image_size or c.data.image_size,
                     rope_theta=m.rope_theta, ln_eps=m.ln_eps)
    overrides |= {f: m[f] for f in SHAPE_FIELDS if m[f]}
    if m.act:
        overrides["act"] = m.act
    elif m.pos == "learned":
        overrides["act"] = "quick_gelu"
    if not m.size:
        unset = [f"model.{f}" for f in SHAPE_FIELDS if not m[f]]
        if unset:
            raise UserError(f"config.model.size is '': set {', '.join(unset)} (or a size name: "
                            f"{', '.join(SIZES)})")
        return ViTConfig(**overrides)
    return vit_config(m.size, **overrides)


def _param(rngs, init, shape, axes):
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


def dense(cfg, n_in, n_out, axes, rngs, *, bias=True):
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02),
                      kernel_metadata={"logical_axes": axes},
                      bias_metadata={"logical_axes": axes[1:]})


def layer_norm(cfg, rngs):
    return nnx.LayerNorm(cfg.width, epsilon=cfg.ln_eps, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                         scale_metadata={"logical_axes": ("norm",)},
                         bias_metadata={"logical_axes": ("norm",)})


def rope_angles(cfg: ViTConfig, grid_h: int, grid_w: int, class_pos_emb: jax.Array) -> jax.Array:
    """Rotation angles (1 + h·w, head_dim) in float32; row 0 is the class token's."""
    rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
    return rope_angles_at(cfg, jnp.stack([rows.reshape(-1), cols.reshape(-1)], -1),
                          class_pos_emb)


def rope_angles_at(cfg: ViTConfig, positions: jax.Array, class_pos_emb: jax.Array) -> jax.Array:
    """Rotation angles (..., 1 + T, head_dim) in float32 of patches at `positions` (..., T, 2)
    (row, col): [row·inv_freq, col·inv_freq] twice; row 0 is the class token's."""
    quarter = cfg.head_dim // 4
    inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(quarter, dtype=jnp.float32) * 2 / (2 * quarter))
    rows, cols = positions[..., 0:1], positions[..., 1:2]
    patches = jnp.concatenate([rows * inv_freq, cols * inv_freq], -1)
    cls = jnp.broadcast_to(class_pos_emb.astype(jnp.float32),
                           patches.shape[:-2] + class_pos_emb.shape)
    angles = jnp.concatenate([cls, patches], axis=-2)  # (..., 1 + T, hd/2)
    return jnp.concatenate([angles, angles], axis=-1)


class Rope(NamedTuple):
    """cos and sin of the rotation angles, (T, 1, H) or per image (B, T, 1, H) float32: made once
    per forward pass."""
    cos: jax.Array
    sin: jax.Array

    @classmethod
    def of(cls, angles: jax.Array) -> Rope:
        return cls(jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :])


def resized_positions(table: jax.Array, grid: tuple[int, int], positions: jax.Array,
                      mask: jax.Array) -> jax.Array:
    """A learned position table (1 + h·w, W) made for a `grid` (h, w), resized to each image's own
    grid (its largest row and col + 1 among `mask`ed `positions` (B, T, 2)) and read at each
    patch: (B, T, W). Bilinear with half-pixel centres, antialiased when shrinking (the triangle
    filter widened by the scale, weights normalised): `jax.image.resize(..., "bilinear")` of the
    table, per image, without its dynamic shapes. At the table's own grid it is the table."""
    h, w = grid
    real = lambda axis: jnp.max(jnp.where(mask, positions[..., axis], 0), axis=-1) + 1  # (B,)

    def weights(coord, out_size, in_size):  # (B, T, in_size): each patch's weight per table row
        scale = in_size / out_size.astype(jnp.float32)
        centre = (coord.astype(jnp.float32) + 0.5) * scale[:, None] - 0.5
        width = jnp.maximum(scale, 1.0)[:, None, None]
        tri = jnp.maximum(0.0, 1.0 - jnp.abs(jnp.arange(in_size) - centre[..., None]) / width)
        return tri / tri.sum(-1, keepdims=True)

    wy = weights(positions[..., 0], real(0), h)
    wx = weights(positions[..., 1], real(1), w)
    b, t = positions.shape[:2]
    mix = (wy[..., :, None] * wx[..., None, :]).reshape(b * t, h * w)
    return (mix @ table[1:].astype(jnp.float32)).reshape(b, t, -1)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """x (B, T, N, H) rotated half-split by `rope`, in float32 (one elementwise fusion)."""
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * rope.cos + rotated * rope.sin).astype(x.dtype)


def attention_implementation(cfg: ViTConfig) -> tuple[str, int]:
    """(implementation, token multiple) of `cfg`'s attention; "auto" as `backend.attention`
    resolves it for this process's devices (`step.build` resolves it for the mesh's first)."""
    impl = backend.attention(cfg.attention, cfg.dtype)
    multiple = cfg.attention_pad or (CUDNN_TOKEN_MULTIPLE if impl == "cudnn" else 1)
    return impl, multiple


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "xla",
              multiple: int = 1, causal: bool = False,
              lengths: jax.Array | None = None) -> jax.Array:
    """Softmax attention over (B, T, N, H) inputs (`causal`: each token sees those before it).
    With `multiple` > 1 the token axis is padded to a multiple of it and the padding masked out
    (as keys; padded queries are dropped), which is the same function of the T real tokens.
    `lengths` (B,): only each row's first lengths[b] tokens are real (native resolution's
    padding): the others are never attended to, and their own outputs are meaningless."""
    t = q.shape[1]
    padded = -(-t // multiple) * multiple
    if padded == t and lengths is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                            implementation=implementation)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
    if lengths is None:
        lengths = jnp.full((q.shape[0],), t, jnp.int32)
    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, is_causal=causal,
                                       implementation=implementation)
    return out[:, :t]


class Block(nnx.Module):
    """A pre-norm transformer block, transformers' CLIP layout. `cfg` is a ViTConfig or any config
    with its width/heads/mlp_dim/act/ln_eps/dtype/attention fields (the text tower's); `causal`
    attention for text."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, causal: bool = False):
        self.causal = causal
        self.cfg = cfg
        w = cfg.width
        self.layer_norm1 = layer_norm(cfg, rngs)
        self.q_proj = dense(cfg, w, w, ("embed", "heads"), rngs)
        self.k_proj = dense(cfg, w, w, ("embed", "heads"), rngs)
        self.v_proj = dense(cfg, w, w, ("embed", "heads"), rngs)
        self.out_proj = dense(cfg, w, w, ("heads", "embed"), rngs)
        self.layer_norm2 = layer_norm(cfg, rngs)
        self.fc1 = dense(cfg, w, cfg.mlp_dim, ("embed", "mlp"), rngs)
        self.fc2 = dense(cfg, cfg.mlp_dim, w, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array, rope: Rope | None,
                 lengths: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        b, t, w = x.shape
        # The dense layers see 2-D (tokens, width): XLA:CPU computes the weight gradient of a dense
        # layer over (batch, tokens, width) ~4× slower than the same GEMM over
        # (batch·tokens, width).
        x = x.reshape(b * t, w)
        # Scanned blocks in half precision without remat: the layer norms, RoPE and the
        # activation keep only their input for the backward pass and recompute the rest there
        # (elementwise work). A scan's forward and backward are separate loops, so whatever the
        # backward reads is stored for every layer, and their float32 intermediates (x², x −
        # mean, the rotated halves; GELU's erfc and exp) were half of it (docs/performance.md,
        # "On a GPU"). Unrolled, XLA fuses them into the backward by itself; under remat the
        # block is recomputed anyway; in float32 the program stays as it was.
        light = (getattr(cfg, "scan", False) and not getattr(cfg, "remat", False)
                 and cfg.dtype != "float32")
        h = recomputed(self.layer_norm1, x) if light else self.layer_norm1(x)
        split = lambda y: y.reshape(b, t, cfg.heads, cfg.head_dim)
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        if rope is not None:
            rotate = jax.checkpoint(apply_rope) if light else apply_rope
            q, k = rotate(q, rope), rotate(k, rope)
        impl, multiple = attention_implementation(cfg)
        attn = attention(q, k, v, implementation=impl, multiple=multiple, causal=self.causal,
                         lengths=lengths).reshape(b * t, w)
        x = x + self.out_proj(attn)
        act = jax.checkpoint(ACTIVATIONS[cfg.act]) if light else ACTIVATIONS[cfg.act]
        h = recomputed(self.layer_norm2, x) if light else self.layer_norm2(x)
        x = x + self.fc2(act(self.fc1(h)))
        return x.reshape(b, t, w)


def recomputed(module: nnx.Module, x: jax.Array) -> jax.Array:
    """module(x), keeping nothing for the backward pass but its input and parameters."""
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


class ViT(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w = cfg.width
        self.patch_embedding = nnx.Conv(
            cfg.channels, w, (cfg.patch, cfg.patch), strides=cfg.patch, padding="VALID",
            use_bias=False, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
            kernel_init=nnx.initializers.normal(0.02),
            kernel_metadata={"logical_axes": (None, None, None, "embed")})
        self.class_embedding = _param(rngs, nnx.initializers.normal(w ** -0.5), (w,), ("embed",))
        if cfg.pos == "learned":
            grid_h, grid_w = (s // cfg.patch for s in cfg.image_hw)
            self.position_embedding = _param(rngs, nnx.initializers.normal(0.02),
                                             (1 + grid_h * grid_w, w), (None, "embed"))
        else:
            self.class_pos_emb = _param(rngs, nnx.initializers.normal((cfg.head_dim // 2) ** -0.5),
                                        (1, cfg.head_dim // 2), (None, None))
        self.pre_layrnorm = layer_norm(cfg, rngs)

        self.blocks = stacked_blocks(cfg, rngs)  # every parameter has a leading (depth,) axis
        self.post_layernorm = layer_norm(cfg, rngs)
        self.projection = (dense(cfg, w, cfg.embed_dim, ("embed", "proj"), rngs, bias=False)
                           if cfg.embed_dim else None)

    def __call__(self, pixels: jax.Array | Patches) -> ViTOutput:
        """pixels: (B, H, W, C) normalised images (NHWC); H and W divisible by the patch. Or
        `Patches`: images at their own sizes (native resolution)."""
        if isinstance(pixels, Patches):
            return self.native(pixels)
        cfg = self.cfg
        b, height, width, _ = pixels.shape
        if height % cfg.patch or width % cfg.patch:
            raise UserError(f"image size {height}×{width} is not divisible by patch {cfg.patch}")
        grid_h, grid_w = height // cfg.patch, width // cfg.patch
        x = self.patch_embedding(pixels.astype(cfg.dtype)).reshape(b, grid_h * grid_w, cfg.width)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1)
        rope = None
        if cfg.pos == "learned":
            if (height, width) != cfg.image_hw:
                raise UserError(f"this ViT's learned position embedding is for {cfg.image_hw} "
                                f"images, got {height}×{width}; use pos='rope' for any size")
            x = x + self.position_embedding[...].astype(x.dtype)
        else:
            rope = Rope.of(rope_angles(cfg, grid_h, grid_w, self.class_pos_emb[...]))
        x = self.pre_layrnorm(x)
        x = run_blocks(self.blocks, self.cfg, x, rope)
        pooled = self.post_layernorm(x[:, 0])
        embedding = self.projection(pooled) if self.projection is not None else pooled
        return ViTOutput(x, pooled, embedding)

    def native(self, p: Patches) -> ViTOutput:
        """The forward pass of images at their own sizes (see the module's docstring)."""
        cfg = self.cfg
        b, t, d = p.patches.shape
        if d != cfg.patch * cfg.patch * cfg.channels:
            raise UserError(f"patches of {d} values, but this ViT's are {cfg.patch}×{cfg.patch}"
                            f"×{cfg.channels} = {cfg.patch * cfg.patch * cfg.channels}")
        dtype = jnp.dtype(cfg.dtype)
        kernel = self.patch_embedding.kernel[...].reshape(d, cfg.width)  # the conv as a dense
        x = (p.patches.reshape(b * t, d).astype(dtype) @ kernel.astype(dtype)).reshape(
            b, t, cfg.width)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1)
        rope = None
        if cfg.pos == "learned":
            grid = tuple(s // cfg.patch for s in cfg.image_hw)
            table = self.position_embedding[...]
            at = resized_positions(table, grid, p.positions, p.mask)
            x = x + jnp.concatenate([jnp.broadcast_to(table[:1], (b, 1, cfg.width)), at],
                                    axis=1).astype(x.dtype)
        else:
            rope = Rope.of(rope_angles_at(cfg, p.positions, self.class_pos_emb[...]))
        lengths = 1 + jnp.sum(p.mask, axis=-1, dtype=jnp.int32)  # the class token, then patches
        x = self.pre_layrnorm(x)
        x = run_blocks(self.blocks, self.cfg, x, rope, lengths)
        x = jnp.where(jnp.arange(1 + t)[None, :, None] < lengths[:, None, None], x, 0)
        pooled = self.post_layernorm(x[:, 0])
        embedding = self.projection(pooled) if self.projection is not None else pooled
        return ViTOutput(x, pooled, embedding)


def stacked_blocks(cfg, rngs: nnx.Rngs, causal: bool = False) -> Block:
    """cfg.depth blocks stored as one, every parameter with a leading (depth,) axis."""
    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
        return Block(cfg, rngs=rngs, causal=causal)

    return make(rngs)


def run_blocks(blocks: Block, cfg, x: jax.Array, rope: Rope | None = None,
               lengths: jax.Array | None = None) -> jax.Array:
    """x through the stacked blocks: scanned or unrolled, rematerialised per cfg; `lengths`:
    each row's real tokens (the rest padding, never attended to)."""
    graphdef, stacked = nnx.split(blocks)

    def block(x, params):
        return nnx.merge(graphdef, params)(x, rope, lengths), None

    if cfg.remat:
        block = jax.checkpoint(block, prevent_cse=not cfg.scan,
                               policy=remat_policy(cfg.remat_policy))
    if cfg.scan:
        return jax.lax.scan(block, x, stacked)[0]
    for i in range(cfg.depth):
        x, _ = block(x, jax.tree.map(lambda p: p[i], stacked))
    return x


def remat_policy(name: str):
    """The jax.checkpoint policy of a REMAT_POLICIES name."""
    kept = REMAT_POLICIES[name]
    return None if kept is None else getattr(jax.checkpoint_policies, kept)


def with_params(cfg, params: dict, cls=None):
    """A model of `cfg` (a ViT, or `cls`) holding `params` (a pure dict of arrays, as
    `nnx.to_pure_dict` gives)."""
    model = nnx.eval_shape(lambda: (cls or ViT)(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model
