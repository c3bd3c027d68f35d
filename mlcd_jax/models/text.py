"""The CLIP text transformer (transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``),
the text tower that LiT trains against a locked MLCD image encoder.

Token + learned position embedding, causal pre-norm blocks (the ViT's `Block`, causal), a final
layer norm, the pooled output at the end-of-text token, and an optional bias-free projection to
the embedding width. Parameters are float32 with `logical_axes` metadata; compute runs in `dtype`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd_jax.models import vit
from mlcd_jax.runtime.errors import UserError


@dataclasses.dataclass(frozen=True)
class TextConfig:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    vocab_size: int = 49_408
    context_length: int = 77                 # positions (transformers' max_position_embeddings)
    embed_dim: int | None = None             # bias-free projection width (None: none)
    eos_token_id: int | None = 49_407        # pooled here; None: at the largest id (legacy CLIP)
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    dtype: str = "float32"
    scan: bool = False
    remat: bool = False
    remat_policy: str = "full"
    attention: str = "auto"
    attention_pad: int = 0

    def __post_init__(self):
        for name in ("width", "depth", "heads", "mlp_dim", "vocab_size", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"TextConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise UserError(f"TextConfig.width {self.width} is not divisible by heads "
                            f"{self.heads}")
        if self.act not in vit.ACTIVATIONS:
            raise UserError(f"TextConfig.act must be one of {tuple(vit.ACTIVATIONS)}, got "
                            f"{self.act!r}")
        if self.dtype not in vit.DTYPES:
            raise UserError(f"TextConfig.dtype must be one of {vit.DTYPES}, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


# The paper's text towers (CLIP's: B for the B/32 and B/16 image encoders, L for L/14).
SIZES = {
    "B": dict(width=512, depth=12, heads=8, mlp_dim=2048),
    "L": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "tiny": dict(width=64, depth=2, heads=4, mlp_dim=128, vocab_size=1000, context_length=16),
}


def text_config(name: str, **overrides) -> TextConfig:
    if name not in SIZES:
        raise UserError(f"unknown text tower size {name!r}; known sizes: {', '.join(SIZES)}")
    return TextConfig(**(SIZES[name] | overrides))


class TextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, T, width), after the final layer norm (as transformers)
    pooler_output: jax.Array      # (B, width): at each sequence's end-of-text token
    embedding: jax.Array          # (B, embed_dim): its projection (or it, if none)


class TextTransformer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w = cfg.width
        self.token_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, w), jnp.float32),
            logical_axes=("vocab", "embed"))
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.01)(rngs.params(), (cfg.context_length, w), jnp.float32),
            logical_axes=(None, "embed"))
        self.blocks = vit.stacked_blocks(cfg, rngs, causal=True)
        self.final_layer_norm = vit.layer_norm(cfg, rngs)
        self.projection = (vit.dense(cfg, w, cfg.embed_dim, ("embed", "proj"), rngs,
                                       bias=False) if cfg.embed_dim else None)

    def __call__(self, tokens: jax.Array) -> TextOutput:
        """tokens: (B, T) int ids, T ≤ context_length, padded after the end-of-text token (the
        padding cannot reach it: attention is causal)."""
        cfg = self.cfg
        b, t = tokens.shape
        if t > cfg.context_length:
            raise UserError(f"{t} tokens per text, but this text tower has {cfg.context_length} "
                            "positions")
        x = self.token_embedding[...][tokens] + self.position_embedding[...][:t]
        x = vit.run_blocks(self.blocks, cfg, x.astype(cfg.dtype))
        x = self.final_layer_norm(x)
        if cfg.eos_token_id is None:
            end = jnp.argmax(tokens, axis=-1)
        else:
            end = jnp.argmax(tokens == cfg.eos_token_id, axis=-1)
        pooled = x[jnp.arange(b), end]
        embedding = self.projection(pooled) if self.projection is not None else pooled
        return TextOutput(x, pooled, embedding)


def with_params(cfg: TextConfig, params: dict) -> TextTransformer:
    """A text tower of `cfg` holding `params` (a pure dict of arrays)."""
    return vit.with_params(cfg, params, cls=TextTransformer)
