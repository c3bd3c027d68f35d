"""What the ViT keeps for its backward pass: in half precision with scanned blocks and no remat,
only compute-dtype activations cross from the forward loop to the backward one (the layer norms',
RoPE's and GELU's float32 intermediates are recomputed there); float32 programs are unchanged.
On an H200 this took B/16's temporaries at batch 256 from 42.1 to 21.3 GiB (docs/performance.md)."""

import contextlib
import io
import re

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from mlcd_jax.models import vit


def residuals(cfg) -> list[str]:
    """What the backward pass of `cfg`'s ViT reads from the forward, one line each: shape, then
    where it comes from (jax's print_saved_residuals)."""
    graphdef, params = nnx.split(vit.ViT(cfg, rngs=nnx.Rngs(0)))
    x = jnp.zeros((4, *cfg.image_hw, 3))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x).embedding.astype(jnp.float32))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, params)
    return out.getvalue().splitlines()


def per_layer_float32(lines, depth, tokens) -> list[str]:
    """float32 activations stacked over the layers: not parameters, and not XLA attention's
    scores (…, T, T) and softmax statistics (…, T, 1) (XLA's attention on this CPU; cuDNN's
    on a GPU keeps neither)."""
    found = []
    for line in lines:
        dims = [int(d) for d in re.findall(r"\d+", line.split("]")[0].split("[")[1])]
        if (line.startswith("f32[") and dims and dims[0] == depth
                and "from the argument" not in line and dims[-2:] not in ([tokens, tokens],
                                                                          [tokens, 1])):
            found.append(line)
    return found


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_scanned_half_precision_blocks_keep_no_float32_activation(pos):
    cfg = vit.vit_config("tiny", pos=pos, dtype="bfloat16", scan=True, embed_dim=16)
    kept = residuals(cfg)
    assert not per_layer_float32(kept, cfg.depth, 17), kept
    assert any(line.startswith(f"bf16[{cfg.depth},") for line in kept)  # it sees the stack


def test_float32_programs_keep_what_they_kept():
    """float32 (the CPU demo and tests): the layer norms' float32 intermediates are kept as
    before, so nothing there changes (the check above would see them)."""
    cfg = vit.vit_config("tiny", pos="rope", dtype="float32", scan=True, embed_dim=16)
    assert per_layer_float32(residuals(cfg), cfg.depth, 17)
