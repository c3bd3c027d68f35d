"""RICE's Region Transformer layer (mlcd_jax/models/region.py) against a float64 reference written
here with loops: each region attends to itself and to the patches its box overlaps, nothing else.
Boxes: the whole image, one covering a single patch, one across four patches, a padded (empty)
region. Values and gradients, jitted with the batch split over 1, 2, 4 and 8 devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mlcd_jax.models import region, vit
from mlcd_jax.runtime import mesh as mesh_lib

CFG = vit.vit_config("micro", image_size=16)  # width 32, 2 heads, patch 4: a 4 × 4 grid
GRID, PATCH, LAYERS = (4, 4), 4, 2
BOXES = np.array([[0, 0, 16, 16],        # the whole image: all 16 patches
                  [4.5, 4.5, 7.5, 7.5],  # inside one patch: (row 1, col 1) only
                  [2, 6, 6, 10],         # across four patches: rows 1–2, cols 0–1
                  [0, 0, 0, 0]],         # a padded region: no patch, only itself
                 np.float32)


def erf(x):
    return np.vectorize(math.erf)(x)


def reference(params, hidden, boxes):
    """Float64, one region at a time, with explicit loops over heads and patches."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    hidden = np.asarray(hidden, np.float64)
    batch, n = boxes.shape[:2]
    heads, hd = CFG.heads, CFG.width // CFG.heads

    def norm(x, ln):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + CFG.ln_eps) * ln["scale"] + ln["bias"]

    def dense(x, d):
        return x @ d["kernel"] + d["bias"]

    def inside(box, r, c):
        x0, y0, x1, y1 = box
        return (x0 < (c + 1) * PATCH and x1 > c * PATCH and y0 < (r + 1) * PATCH
                and y1 > r * PATCH)

    out = np.zeros((batch, n, CFG.width))
    for b in range(batch):
        patches = hidden[b, 1:]
        tokens = np.tile(p["region_embedding"], (n, 1))
        for layer in range(LAYERS):
            q_p = p["blocks"][layer]
            keys_in = np.concatenate([tokens, patches])
            h = norm(keys_in, q_p["layer_norm1"])
            q, k, v = (dense(h, q_p[name]) for name in ("q_proj", "k_proj", "v_proj"))
            new = np.zeros_like(tokens)
            for i in range(n):
                seen = [i] + [n + r * GRID[1] + c for r in range(GRID[0]) for c in range(GRID[1])
                              if inside(boxes[b, i], r, c)]
                attn = np.zeros(CFG.width)
                for head in range(heads):
                    cols = slice(head * hd, (head + 1) * hd)
                    scores = np.array([q[i, cols] @ k[j, cols] for j in seen]) / np.sqrt(hd)
                    w = np.exp(scores - scores.max())
                    attn[cols] = (w / w.sum()) @ v[seen, cols]
                x = tokens[i] + dense(attn, q_p["out_proj"])
                m = dense(norm(x, q_p["layer_norm2"]), q_p["fc1"])
                new[i] = x + dense(0.5 * m * (1 + erf(m / np.sqrt(2))), q_p["fc2"])
            tokens = new
        out[b] = tokens
    return out


def setup(batch=8):
    model = region.RegionLayers(CFG, LAYERS, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(np.float32),
                          params)  # biases and norms away from 0 and 1, so each is exercised
    hidden = rng.normal(size=(batch, 1 + 16, CFG.width)).astype(np.float32)
    boxes = np.stack([np.roll(BOXES, b, axis=0) for b in range(batch)])  # each image its order
    graphdef = nnx.graphdef(model)
    apply = lambda params, hidden, boxes: nnx.merge(graphdef, params)(hidden, boxes, GRID)
    return apply, params, hidden, boxes


def test_patch_mask_is_each_boxs_overlapping_patches():
    mask = np.asarray(region.patch_mask(jnp.asarray(BOXES[None]), *GRID, PATCH))[0]
    assert mask[0].all() and not mask[3].any()
    assert np.flatnonzero(mask[1]).tolist() == [1 * 4 + 1]
    assert np.flatnonzero(mask[2]).tolist() == [4, 5, 8, 9]


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_values_and_gradients_equal_the_float64_reference(devices, n):
    apply, params, hidden, boxes = setup()
    want = reference(params, hidden, boxes)
    mesh = mesh_lib.make_mesh([("data", -1)], devices[:n])
    split = NamedSharding(mesh, P("data"))
    hidden_d, boxes_d = jax.device_put(hidden, split), jax.device_put(boxes, split)
    got = jax.jit(apply, out_shardings=split)(params, hidden_d, boxes_d)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * scale, rtol=0)

    # Gradients: along random directions of the patches and of the region embedding, against
    # central differences of the float64 reference.
    rng = np.random.default_rng(n)
    weights = rng.normal(size=want.shape)
    loss = lambda params, hidden: jnp.sum(apply(params, hidden, boxes_d) * weights)
    g_params, g_hidden = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, hidden_d)
    ref_loss = lambda params, hidden: float(np.sum(reference(params, hidden, boxes) * weights))
    eps = 1e-4
    d_hidden = rng.normal(size=hidden.shape)
    d_hidden[:, 0] = 0  # the image's class token is no key of the region layer: its gradient is 0
    numeric = (ref_loss(params, hidden + eps * d_hidden)
               - ref_loss(params, hidden - eps * d_hidden)) / (2 * eps)
    analytic = float(np.sum(np.asarray(g_hidden, np.float64) * d_hidden))
    assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-3 * abs(numeric) + 1e-6)
    assert not np.asarray(g_hidden)[:, 0].any()
    d_emb = rng.normal(size=CFG.width)
    shifted = lambda s: jax.tree.map(lambda a: a, params) | {
        "region_embedding": np.asarray(params["region_embedding"], np.float64) + s * d_emb}
    numeric = (ref_loss(shifted(eps), hidden) - ref_loss(shifted(-eps), hidden)) / (2 * eps)
    analytic = float(np.sum(np.asarray(g_params["region_embedding"], np.float64) * d_emb))
    assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-6)


def test_a_region_sees_only_its_box():
    """Changing a patch outside a box leaves that region's output as it was; inside, it moves."""
    apply, params, hidden, boxes = setup(batch=1)
    before = np.asarray(apply(params, hidden, boxes))[0]
    moved = hidden.copy()
    moved[0, 1 + 15] = -moved[0, 1 + 15]  # patch (3, 3): only the whole-image box overlaps it
    after = np.asarray(apply(params, moved, boxes))[0]
    whole = int(np.flatnonzero((boxes[0] == BOXES[0]).all(1))[0])
    for i in range(4):
        if i == whole:
            assert np.abs(after[i] - before[i]).max() > 1e-3
        else:
            np.testing.assert_array_equal(after[i], before[i])
