"""The ViT family: sizes, execution modes (scan / unrolled / remat / bf16), any-size RoPE,
sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlcd_jax.models import vit
from mlcd_jax.runtime import mesh as mesh_lib

from helpers.numerics import assert_same_math


def make(name="tiny", seed=0, **overrides):
    return vit.ViT(vit.vit_config(name, **overrides), rngs=nnx.Rngs(seed))


def pixels(h=32, w=32, b=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, 3)), jnp.float32)


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def expected_params(width, depth, mlp, patch, channels=3, positions=0, head_dim=0, embed=0):
    """Counted by hand from the architecture (transformers' layout), independent of the code."""
    block = 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width
    top = patch * patch * channels * width + width + 4 * width  # patch conv, class token, 2 norms
    return depth * block + top + positions * width + head_dim // 2 + width * embed


@pytest.mark.parametrize("name, width, depth, heads, mlp, patch", [
    ("B/32", 768, 12, 12, 3072, 32), ("B/16", 768, 12, 12, 3072, 16),
    ("L/14", 1024, 24, 16, 4096, 14), ("L/14@336", 1024, 24, 16, 4096, 14),
    ("H/14", 1280, 32, 16, 5120, 14), ("bigG/14", 1664, 48, 16, 8192, 14),
])
def test_named_sizes(name, width, depth, heads, mlp, patch):
    for pos in ("rope", "learned"):
        cfg = vit.vit_config(name, pos=pos, embed_dim=512)
        assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch) == (width, depth, heads,
                                                                            mlp, patch)
        model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))  # no memory allocated
        grid = (cfg.image_hw[0] // patch) ** 2
        want = expected_params(width, depth, mlp, patch, embed=512,
                               positions=(1 + grid) if pos == "learned" else 0,
                               head_dim=0 if pos == "learned" else width // heads)
        assert n_params(model) == want


def test_unknown_size_and_bad_config():
    with pytest.raises(ValueError, match="unknown ViT size 'B/8'; known sizes: B/32"):
        vit.vit_config("B/8")
    with pytest.raises(ValueError, match="pos must be one of"):
        vit.vit_config("tiny", pos="sincos")
    with pytest.raises(ValueError, match="act must be one of"):
        vit.vit_config("tiny", act="relu6")
    with pytest.raises(ValueError, match="not divisible by heads"):
        vit.vit_config("tiny", heads=5)
    for field, value, message in (("width", 0, "width must be a positive integer"),
                                  ("depth", -1, "depth must be a positive integer"),
                                  ("ln_eps", float("nan"), "ln_eps must be a finite positive"),
                                  ("rope_theta", 0.0, "rope_theta must be a finite positive"),
                                  ("image_size", (32, 0), "image_size must be positive"),
                                  ("embed_dim", 0, "embed_dim must be None or a positive"),
                                  ("dtype", "int8", "dtype must be one of")):
        with pytest.raises(ValueError, match=message):
            vit.vit_config("tiny", **{field: value})


def test_outputs_and_projection():
    out = make(embed_dim=24)(pixels())
    assert out.last_hidden_state.shape == (2, 1 + 16, 64)
    assert out.pooler_output.shape == (2, 64)
    assert out.embedding.shape == (2, 24)
    plain = make()(pixels())
    np.testing.assert_array_equal(plain.embedding, plain.pooler_output)


def test_rope_takes_any_size_learned_does_not():
    model = make()
    for h, w in [(32, 32), (32, 48), (56, 16), (8, 8)]:
        assert model(pixels(h, w)).last_hidden_state.shape == (2, 1 + (h // 8) * (w // 8), 64)
    with pytest.raises(ValueError, match="not divisible by patch 8"):
        model(pixels(30, 32))
    with pytest.raises(ValueError, match="learned position embedding is for"):
        make(pos="learned")(pixels(32, 48))


def test_rope_makes_position_matter():
    """Permuting patches changes RoPE outputs (positions are encoded), unlike a position-free
    ViT."""
    model = make()
    x = pixels()
    flipped = x[:, ::-1]  # rows of patches reversed
    a, b = model(x).pooler_output, model(flipped).pooler_output
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_scan_and_remat_match_unrolled(pos):
    """Same math, other execution: loss and every gradient equal the unrolled model's. The loss is a
    fixed random projection of the pooled output: sum(pooled²) would be constant under the final
    layer norm, its gradients pure float cancellation noise (they differed by 17 % between CPUs)."""
    x = pixels()
    direction = jax.random.normal(jax.random.key(1), (2, 64))
    base = make(pos=pos)
    state = nnx.state(base)

    def loss_and_grad(cfg_overrides):
        model = make(pos=pos, **cfg_overrides)
        nnx.update(model, state)
        graphdef, params = nnx.split(model)
        f = lambda p: jnp.sum(nnx.merge(graphdef, p)(x).pooler_output * direction)
        return jax.jit(jax.value_and_grad(f))(params)

    want_loss, want_grad = loss_and_grad({})
    for overrides in ({"scan": True}, {"remat": True}, {"scan": True, "remat": True},
                      {"remat": True, "remat_policy": "dots"},
                      {"scan": True, "remat": True, "remat_policy": "dots"},
                      {"attention_pad": 64}, {"attention_pad": 8, "scan": True}):
        loss, grad = loss_and_grad(overrides)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        assert_same_math(grad, want_grad, rtol=1e-5)


def reference_attention(q, k, v):
    """Softmax attention in float64 numpy, written out: (B, T, N, H) → (B, T, N, H)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("tokens", [1, 5, 17, 50, 64, 65, 197])
def test_padded_masked_attention_is_unpadded_attention(tokens):
    """The cuDNN path's padding (token axis to a multiple, padding masked), run through XLA: the
    same values as float64 attention over the real tokens, and the same gradients as unpadded."""
    rng = np.random.default_rng(tokens)
    q, k, v = (jnp.asarray(rng.normal(size=(2, tokens, 3, 8)), jnp.float32) for _ in range(3))
    want = reference_attention(q, k, v)
    direction = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grads = {}
    for multiple in (1, 8, 64):
        out = vit.attention(q, k, v, implementation="xla", multiple=multiple)
        assert out.shape == q.shape
        assert_same_math(np.asarray(out, np.float64), want, rtol=1e-5)
        f = lambda q, k, v: jnp.sum(vit.attention(q, k, v, multiple=multiple) * direction)
        grads[multiple] = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    for multiple in (8, 64):
        assert_same_math(grads[multiple], grads[1], rtol=1e-5)


def test_attention_implementation_and_remat_policy_choices():
    cfg = vit.vit_config("tiny")
    assert vit.attention_implementation(cfg) == ("xla", 1)  # this CPU
    assert vit.attention_implementation(vit.vit_config("tiny", attention_pad=8)) == ("xla", 8)
    assert vit.attention_implementation(vit.vit_config("tiny", attention="cudnn")) == ("cudnn", 64)
    for bad in ({"attention": "flash"}, {"remat_policy": "some"}, {"attention_pad": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vit.vit_config("tiny", **bad)


def test_bfloat16_compute_float32_params():
    f32 = make()
    bf16 = make(dtype="bfloat16")
    nnx.update(bf16, nnx.state(f32))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    out16, out32 = bf16(pixels()), f32(pixels())
    assert out16.pooler_output.dtype == jnp.bfloat16
    err = jnp.linalg.norm(out16.pooler_output.astype(jnp.float32) - out32.pooler_output)
    assert float(err / jnp.linalg.norm(out32.pooler_output)) < 3e-2


def test_param_shardings_fsdp(devices):
    cfg = vit.vit_config("tiny", embed_dim=16, scan=True)
    abstract = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
    mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)])
    shardings = mesh_lib.param_shardings(nnx.state(abstract), mesh)
    specs = {".".join(map(str, k)): v.spec for k, v in nnx.to_flat_state(shardings)}
    assert specs["blocks.q_proj.kernel"] == jax.P(None, "fsdp", None)   # (layers, embed, heads)
    assert specs["blocks.fc2.kernel"] == jax.P(None, None, "fsdp")      # (layers, mlp, embed)
    assert specs["patch_embedding.kernel"] == jax.P(None, None, None, "fsdp")
    assert specs["pre_layrnorm.scale"] == jax.P(None)
    # The model runs with its parameters created directly sharded.
    graphdef, _ = nnx.split(abstract)
    init = jax.jit(lambda: nnx.state(vit.ViT(cfg, rngs=nnx.Rngs(0))), out_shardings=shardings)
    params = init()
    q = params["blocks"]["q_proj"]["kernel"][...]
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 64)}
    out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x).embedding)(params, pixels(b=8))
    want = nnx.merge(graphdef, jax.device_get(params))(pixels(b=8)).embedding
    assert_same_math(out, want)
