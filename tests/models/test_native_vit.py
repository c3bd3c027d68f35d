"""Native resolution: the sizing rule, patches on the host, and the ViT on patches with
their positions and a mask. The model is checked against a float64 numpy ViT written here, which
runs each image alone on its real patches only (so padding changing nothing is checked at the
same time), on 1, 2, 4 and 8 devices; the square path against the same path on a full grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from scipy.special import erf

from mlcd_jax.data import transforms
from mlcd_jax.models import vit
from mlcd_jax.runtime import mesh as mesh_lib

from helpers.numerics import assert_same_math

# ------------------------------------------------------------------------------------------------
# The sizing rule and the host side
# ------------------------------------------------------------------------------------------------


def test_budget_size_keeps_the_aspect_ratio_and_fills_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 2000, 2))
        p, n = int(rng.choice([4, 14, 16])), int(rng.integers(1, 1100))
        H, W = transforms.budget_size(h, w, p, n)
        assert H % p == 0 and W % p == 0 and H >= p and W >= p
        assert (H // p) * (W // p) <= n
        # the largest such size: one more patch-step of scale would not fit
        s = min((H / p + 1) / (h / p), (W / p + 1) / (w / p))
        bigger = (max(1, np.ceil(h * s / p)) * max(1, np.ceil(w * s / p)))
        assert bigger > n or H // p == 1 or W // p == 1
        # the aspect ratio within a patch's rounding per side
        if H // p > 2 and W // p > 2:
            assert abs(np.log((W / H) / (w / h))) < np.log((W / p) / (W / p - 1)) + np.log(
                (H / p) / (H / p - 1)) + 1e-9


def test_min_tokens_keeps_own_size_inside_the_range():
    n = transforms.Native(patch=4, max_tokens=64, min_tokens=16)
    assert n.size(20, 21) == (20, 24)       # 5 × 6 = 30 patches: its own size, whole patches
    assert n.size(8, 8) == transforms.budget_size(8, 8, 4, 16) == (16, 16)  # 4 < 16: enlarged
    assert n.size(400, 100) == transforms.budget_size(400, 100, 4, 64)      # shrunk to the budget
    fill = transforms.Native(patch=4, max_tokens=64)
    assert fill.size(20, 21) == transforms.budget_size(20, 21, 4, 64) == (32, 32)
    with pytest.raises(ValueError, match="min_tokens ≤ max_tokens"):
        transforms.Native(patch=4, max_tokens=8, min_tokens=9)


def test_patchify_is_the_grid_in_row_major_order_then_padding():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    patches, positions, mask = transforms.patchify(image, 4, 10)
    assert patches.shape == (10, 48) and patches.dtype == np.uint8
    assert mask.tolist() == [True] * 6 + [False] * 4
    assert positions[:6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    for k, (r, c) in enumerate(positions[:6]):
        np.testing.assert_array_equal(patches[k], image[4 * r:4 * r + 4, 4 * c:4 * c + 4].ravel())
    assert not patches[6:].any() and not positions[6:].any()
    with pytest.raises(ValueError, match="within 5 tokens"):
        transforms.patchify(image, 4, 5)


def test_native_transforms_keep_the_aspect_ratio_and_the_boxes():
    image = np.zeros((30, 90, 3), np.uint8)
    image[:, 60:] = 255  # the right third white
    record = {"image": image}
    native = transforms.Native(patch=4, max_tokens=32)
    boxes = np.array([[60, 0, 90, 30], [0, 0, 10, 10]], np.float32)
    out, moved, kept = transforms.native_eval_transform(record, native, boxes)
    assert out.shape == (12, 36, 3) == transforms.budget_size(30, 90, 4, 32) + (3,)
    np.testing.assert_allclose(moved, [[24, 0, 36, 12], [0, 0, 4, 4]], atol=1e-4)
    assert kept.all() and out[:, 26:].min() > 200 and out[:, :22].max() < 50
    rng = np.random.default_rng(0)
    for _ in range(20):
        window = transforms.native_crop(Image.fromarray(image), rng, (0.5, 1.0))
        aspect = (window[2] / window[3]) / 3
        assert 3 / 4 - 0.05 < aspect < 4 / 3 + 0.05
        assert 0.45 <= window[2] * window[3] / (30 * 90) <= 1.0
    # a crop that cannot be drawn (area 1 at another aspect ratio): the whole image
    whole = transforms.native_crop(Image.fromarray(image), rng, (1.0, 1.0), ratio=(2.0, 2.0))
    assert whole == (0.0, 0.0, 90.0, 30.0)
    out, moved, kept = transforms.native_train_transform(record, rng, native, (1.0, 1.0),
                                                         flip=False, boxes=boxes)
    assert out.shape == (12, 36, 3)


# ------------------------------------------------------------------------------------------------
# The model: a float64 reference, written out
# ------------------------------------------------------------------------------------------------


def layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p[
        "bias"]


def bilinear_1d(n_in, n_out):
    """(n_out, n_in) weights resizing a length-n_in axis to n_out: classic 2-tap bilinear with
    half-pixel centres when enlarging (clamped at the ends), the triangle filter widened by the
    scale when shrinking (antialiased, as jax.image.resize)."""
    w = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        x = (i + 0.5) * scale - 0.5
        if scale <= 1:
            x = min(max(x, 0.0), n_in - 1.0)
            lo = int(np.floor(x))
            hi = min(lo + 1, n_in - 1)
            w[i, lo] += 1 - (x - lo)
            w[i, hi] += x - lo
        else:
            tri = np.maximum(0, 1 - np.abs(np.arange(n_in) - x) / scale)
            w[i] = tri / tri.sum()
    return w


def reference(params, cfg, image):
    """The ViT in float64 numpy on one normalised (H, W, C) image, no padding: a vector of
    1 + h·w tokens; returns (last hidden state, pooled, embedding)."""
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    p, width = cfg.patch, cfg.width
    gh, gw = image.shape[0] // p, image.shape[1] // p
    patches = image.reshape(gh, p, gw, p, -1).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    x = np.concatenate([P["class_embedding"][None],
                        patches @ P["patch_embedding"]["kernel"].reshape(-1, width)])
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    if cfg.pos == "learned":
        h0, w0 = (s // p for s in cfg.image_hw)
        table = P["position_embedding"][1:].reshape(h0, w0, width)
        resized = np.einsum("ai,bj,ijw->abw", bilinear_1d(h0, gh), bilinear_1d(w0, gw), table)
        x = x + np.concatenate([P["position_embedding"][:1], resized.reshape(gh * gw, width)])
    else:
        quarter = cfg.head_dim // 4
        inv = 1.0 / cfg.rope_theta ** (np.arange(quarter) * 2 / (2 * quarter))
        half = np.concatenate([P["class_pos_emb"],
                               np.concatenate([np.outer(rows, inv), np.outer(cols, inv)], 1)])
        angles = np.concatenate([half, half], 1)[:, None, :]       # (T, 1, head_dim)

        def rotate(y):  # (T, heads, head_dim)
            h = y.shape[-1] // 2
            return y * np.cos(angles) + np.concatenate([-y[..., h:], y[..., :h]], -1) * np.sin(
                angles)
    act = (lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2)))) if cfg.act == "gelu" else (
        lambda v: v / (1 + np.exp(-1.702 * v)))
    x = layer_norm(x, P["pre_layrnorm"], cfg.ln_eps)
    t = len(x)
    for i in range(cfg.depth):
        b = jax.tree.map(lambda a: a[i], P["blocks"])
        dense = lambda y, name: y @ b[name]["kernel"] + b[name]["bias"]
        h = layer_norm(x, b["layer_norm1"], cfg.ln_eps)
        q, k, v = (dense(h, n).reshape(t, cfg.heads, cfg.head_dim)
                   for n in ("q_proj", "k_proj", "v_proj"))
        if cfg.pos == "rope":
            q, k = rotate(q), rotate(k)
        scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(cfg.head_dim)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + dense(np.einsum("nts,snh->tnh", weights, v).reshape(t, width), "out_proj")
        x = x + dense(act(dense(layer_norm(x, b["layer_norm2"], cfg.ln_eps), "fc1")), "fc2")
    pooled = layer_norm(x[0], P["post_layernorm"], cfg.ln_eps)
    embedding = pooled @ P["projection"]["kernel"] if cfg.embed_dim else pooled
    return x, pooled, embedding


# Images of other sizes in one batch (16 × 16 is the micro ViT's own: its learned table's grid).
SIZES = [(16, 16), (8, 24), (28, 4), (4, 4), (12, 20), (16, 8), (24, 24), (20, 12)]
MAX_TOKENS = 40


def native_batch(seed=0, sizes=SIZES, max_tokens=MAX_TOKENS):
    rng = np.random.default_rng(seed)
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]
    rows = [transforms.patchify(im, 4, max_tokens) for im in images]
    return images, vit.Patches(*(np.stack(a) for a in zip(*rows)))


def sharded(batch, mesh):
    return jax.tree.map(lambda x: mesh_lib.global_array(x, mesh_lib.batch_sharding(mesh)), batch)


@pytest.mark.parametrize("pos, n", [("rope", 1), ("rope", 2), ("rope", 4), ("rope", 8),
                                    ("learned", 1), ("learned", 8)])
def test_native_forward_equals_the_float64_reference_and_the_square_path(devices, pos, n):
    """A batch of 8 images of other sizes and aspect ratios, padded to 40 tokens, split over n
    devices: each image's real tokens, pooled output and embedding equal the float64 ViT run on
    that image alone, and the padding's hidden states are zero. And the square path (pixels
    through the conv) equals this path on a full grid (with padding) within 1e-5."""
    cfg = vit.vit_config("micro", pos=pos, embed_dim=8)
    graphdef, params = nnx.split(vit.ViT(cfg, rngs=nnx.Rngs(3)))
    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))
    mesh = mesh_lib.make_mesh([("data", -1)], devices[:n])
    images, batch = native_batch()
    out = forward(params, sharded(batch, mesh))
    pure = nnx.to_pure_dict(params)
    for i, image in enumerate(images):
        real = 1 + int(batch.mask[i].sum())
        hidden, pooled, embedding = reference(pure, cfg, image)
        assert_same_math(np.asarray(out.last_hidden_state[i, :real]), hidden)
        assert_same_math(np.asarray(out.pooler_output[i]), pooled)
        assert_same_math(np.asarray(out.embedding[i]), embedding)
        assert not np.asarray(out.last_hidden_state[i, real:]).any()

    squares, full = native_batch(1, [(16, 16)] * 8)  # the model's own size: a full 4 × 4 grid
    square = forward(params, mesh_lib.global_array(np.stack(squares),
                                                   mesh_lib.batch_sharding(mesh)))
    native = forward(params, sharded(full, mesh))
    assert_same_math(np.asarray(native.last_hidden_state[:, :17]),
                     np.asarray(square.last_hidden_state))
    for name in ("pooler_output", "embedding"):
        assert_same_math(np.asarray(getattr(native, name)), np.asarray(getattr(square, name)))


def test_resized_learned_positions_are_the_table_resized_by_hand():
    """Per image, the table read at each patch equals the table resized to that image's grid by
    jax.image.resize and by the 2-tap / triangle filters written above."""
    h0, w0, width = 4, 6, 5
    table = np.random.default_rng(2).normal(size=(1 + h0 * w0, width)).astype(np.float32)
    grids = [(4, 6), (2, 9), (7, 3), (1, 1), (8, 12)]
    t = max(a * b for a, b in grids)
    positions = np.zeros((len(grids), t, 2), np.int32)
    mask = np.zeros((len(grids), t), bool)
    for i, (a, b) in enumerate(grids):
        positions[i, :a * b] = np.stack(np.divmod(np.arange(a * b), b), 1)
        mask[i, :a * b] = True
    got = np.asarray(vit.resized_positions(jnp.asarray(table), (h0, w0), jnp.asarray(positions),
                                           jnp.asarray(mask)))
    grid_table = table[1:].reshape(h0, w0, width)
    for i, (a, b) in enumerate(grids):
        by_jax = np.asarray(jax.image.resize(grid_table, (a, b, width), "bilinear"))
        by_hand = np.einsum("ai,bj,ijw->abw", bilinear_1d(h0, a), bilinear_1d(w0, b),
                            grid_table.astype(np.float64))
        np.testing.assert_allclose(got[i, :a * b], by_jax.reshape(-1, width), atol=1e-5)
        if a >= h0 and b >= w0 or (a, b) == (h0, w0):  # the 2-tap form is the enlarging one
            np.testing.assert_allclose(got[i, :a * b], by_hand.reshape(-1, width), atol=1e-5)
    np.testing.assert_array_equal(got[0, :h0 * w0], table[1:])  # its own grid: the table itself


def test_padding_gets_no_gradient_and_changes_nothing():
    """The padding's values never reach a real token: gradients with respect to padded patches are
    zero, and filling the padding with noise leaves the output as it was."""
    cfg = vit.vit_config("micro", embed_dim=8)
    model = vit.ViT(cfg, rngs=nnx.Rngs(5))
    _, batch = native_batch(2, SIZES[:4])
    batch = vit.Patches(*map(jnp.asarray, batch))
    graphdef, params = nnx.split(model)
    direction = jax.random.normal(jax.random.key(0), (4, 8))
    embed = jax.jit(lambda patches: nnx.merge(graphdef, params)(
        batch._replace(patches=patches)).embedding)
    grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(embed(x) * direction)))(batch.patches))
    mask = np.asarray(batch.mask)
    assert np.isfinite(grad).all() and not grad[~mask].any() and grad[mask].any()
    noisy = jnp.where(batch.mask[..., None], batch.patches,
                      jax.random.normal(jax.random.key(1), batch.patches.shape) * 100)
    np.testing.assert_array_equal(np.asarray(embed(noisy)), np.asarray(embed(batch.patches)))


def test_native_path_runs_scanned_rematerialised_and_in_bfloat16():
    cfg = vit.vit_config("micro", embed_dim=8)
    base = vit.ViT(cfg, rngs=nnx.Rngs(6))
    _, batch = native_batch(3, SIZES[:4])
    batch = vit.Patches(*map(jnp.asarray, batch))
    embed = lambda model: jax.jit(lambda b: model(b).embedding.astype(jnp.float32))(batch)
    want = embed(base)
    for overrides in ({"scan": True, "remat": True}, {"attention_pad": 64}):
        model = vit.with_params(vit.vit_config("micro", embed_dim=8, **overrides),
                                nnx.to_pure_dict(nnx.state(base)))
        assert_same_math(np.asarray(embed(model)), np.asarray(want))
    half = vit.with_params(vit.vit_config("micro", embed_dim=8, dtype="bfloat16"),
                           nnx.to_pure_dict(nnx.state(base)))
    got = embed(half)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 3e-2
    with pytest.raises(ValueError, match="patches of 47 values"):
        base(batch._replace(patches=batch.patches[..., :47]))
