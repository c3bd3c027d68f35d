"""The sharded head against an independent dense float64 reference, and its sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import sharded_head as head

from helpers.heads import B, D, K, L, make_inputs
from helpers.numerics import assert_same_math

# ---------------------------------------------------------------------------------------------
# Reference: dense B × K cosines in float64, each sample's sets spelled out, the paper's formula.
# ---------------------------------------------------------------------------------------------

def reference_cosines(features, centers):
    """Dense B × K cosines."""
    e = features / jnp.linalg.norm(features, axis=1, keepdims=True)
    w = centers / jnp.linalg.norm(centers, axis=1, keepdims=True)
    return e @ w.T


def reference_margin(cos, *, scale, margin, margin_type):
    """Every cosine's positive logit: s·cos(θ + m) or s·(cos θ − m)."""
    c = jnp.clip(cos, -1.0, 1.0)
    if margin_type == "arcface":
        return scale * jnp.cos(jnp.arccos(c) + margin)
    return scale * (c - margin)


def reference_loss_of_logits(pos, neg, labels, negatives, *, kind):
    """Per DESIGN.md from dense B × K positive logits `pos` and negative logits `neg`, each sample
    taking its positives' entries of `pos` and its negatives' of `neg`; `negatives` are the global
    ids drawn this step (before removing positives)."""
    losses = []
    for b in range(pos.shape[0]):
        positives = [int(y) for y in labels[b] if y >= 0]
        if kind == "unicom":
            positives = positives[:1]
        drawn = [int(j) for j in negatives if j not in positives]
        p = pos[b, jnp.array(positives)]
        n = neg[b, jnp.array(drawn, dtype=int)]
        if kind == "mlcd":
            losses.append(jnp.log(1 + jnp.sum(jnp.exp(-p))) + jnp.log(1 + jnp.sum(jnp.exp(n))))
        else:
            losses.append(-p[0] + jnp.log(jnp.exp(p[0]) + jnp.sum(jnp.exp(n))))
    return jnp.mean(jnp.stack(losses))


def reference_loss(features, centers, labels, negatives, *, kind, scale, margin, margin_type):
    """The loss as a function of features and centers (its autodiff gradient: the exact one)."""
    cos = reference_cosines(features, centers)
    pos = reference_margin(cos, scale=scale, margin=margin, margin_type=margin_type)
    return reference_loss_of_logits(pos, scale * cos, labels, negatives, kind=kind)


def reference_value_and_grad(features, centers, labels, negatives, *,
                             margin_grad="straight_through", **kw):
    """Loss and gradients in float64. "exact": autodiff through cos(arccos(c) + m).
    "straight_through" (the authors' Partial FC): the positive logits' values as above, but taken
    as free variables: d loss / d logit, times s (d(s·c)/dc), pulled back through the cosines."""
    with jax.enable_x64(True):
        f = jnp.asarray(np.asarray(features, np.float64))
        c = jnp.asarray(np.asarray(centers, np.float64))
        labels, negatives = np.asarray(labels), np.asarray(negatives)
        if margin_grad == "exact":
            fn = functools.partial(reference_loss, labels=labels, negatives=negatives, **kw)
            loss, (gf, gc) = jax.value_and_grad(fn, argnums=(0, 1))(f, c)
        else:
            assert margin_grad == "straight_through"
            kind, scale = kw.pop("kind"), kw["scale"]
            cos, pullback = jax.vjp(reference_cosines, f, c)
            pos = reference_margin(cos, **kw)
            loss, (d_pos, d_neg) = jax.value_and_grad(reference_loss_of_logits, argnums=(0, 1))(
                pos, scale * cos, labels, negatives, kind=kind)
            gf, gc = pullback(scale * (d_pos + d_neg))
        return float(loss), np.asarray(gf), np.asarray(gc)


# Angles between samples 0, 1, 2 and their first positive: beyond π − m (m = 0.3), just beyond,
# and before it. Past π − m the exact ArcFace gradient pushes a positive away (at π − 0.2:
# d cos(θ + m)/d cos θ = sin(θ + m)/sin θ ≈ −0.5); the straight-through one still pulls.
FAR_ANGLES = (np.pi - 0.2, np.pi - 0.28, np.pi - 0.4)


def with_far_positives(features, centers, labels, angles=FAR_ANGLES, seed=0):
    """`features` with sample b placed at angles[b] from its first positive's center."""
    rng = np.random.default_rng(seed)
    features = np.array(features)
    for b, angle in enumerate(angles):
        w = centers[labels[b, 0]].astype(np.float64)
        w /= np.linalg.norm(w)
        u = rng.normal(size=w.shape)
        u -= (u @ w) * w
        features[b] = np.cos(angle) * w + np.sin(angle) * u / np.linalg.norm(u)
    return features


def rel_err(x, ref):
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


LOSSES = {"mlcd": head.mlcd_loss, "unicom": head.unicom_loss}


def sharded_value_and_grad(kind, mesh, features, centers, labels, **kw):
    fn = functools.partial(LOSSES[kind], mesh=mesh, **kw)
    if mesh is not None:
        features = jax.device_put(features, mesh_lib.batch_sharding(mesh))
        centers = jax.device_put(jnp.asarray(centers), mesh_lib.replicated(mesh))
    grad_fn = jax.jit(jax.value_and_grad(lambda f, c: fn(f, c, labels), argnums=(0, 1),
                                         has_aux=True))
    (loss, metrics), (gf, gc) = grad_fn(features, centers)
    return float(loss), metrics, np.asarray(gf), np.asarray(gc)


MESHES = {
    "1": [("data", 1)], "2": [("data", 2)], "4": [("data", 4)], "8": [("data", 8)],
    "4x2": [("data", 4), ("model", 2)],                 # batch over 4, classes over 8
    "2x2x2": [("data", 2), ("fsdp", 2), ("model", 2)],
}


def mesh_for(name, devices):
    spec = MESHES[name]
    return mesh_lib.make_mesh(spec, devices[:int(np.prod([s for _, s in spec]))])


@pytest.mark.parametrize("mesh_name", ["1", "2", "4", "8", "4x2", "2x2x2"])
@pytest.mark.parametrize("kind", ["mlcd", "unicom"])
@pytest.mark.parametrize("margin_type, margin_grad", [("arcface", "straight_through"),
                                                      ("arcface", "exact"),
                                                      ("cosface", "straight_through")])
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_sharded_matches_dense_float64_reference(devices, mesh_name, kind, margin_type,
                                                 margin_grad, ratio):
    mesh = mesh_for(mesh_name, devices)
    features, centers, labels = make_inputs(seed=len(mesh_name) + int(ratio * 10))
    features = with_far_positives(features, centers, labels)
    key = jax.random.key(7)
    kw = dict(scale=32.0, margin=0.3, margin_type=margin_type)
    loss, metrics, gf, gc = sharded_value_and_grad(kind, mesh, features, centers, labels, key=key,
                                                   sample_ratio=ratio, margin_grad=margin_grad,
                                                   **kw)
    drawn = np.asarray(head.sample_negative_classes(key, K, num_shards=mesh.size,
                                                    sample_ratio=ratio))
    drawn = drawn[drawn >= 0]
    if ratio == 1.0:
        np.testing.assert_array_equal(np.sort(drawn), np.arange(K))  # exact: every class
    ref_loss, ref_gf, ref_gc = reference_value_and_grad(features, centers, labels, drawn, kind=kind,
                                                        margin_grad=margin_grad, **kw)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    assert rel_err(gf, ref_gf) <= 1e-5
    assert rel_err(gc, ref_gc) <= 1e-5
    assert gf.shape == features.shape and gc.shape == centers.shape


@pytest.mark.parametrize("kind", ["mlcd", "unicom"])
def test_margin_grad_references_differ_on_these_inputs(kind):
    """The inputs above tell the two ArcFace gradients apart, far beyond the tolerance (a mode
    ignored fails there); the loss is the same."""
    features, centers, labels = make_inputs(seed=3)
    features = with_far_positives(features, centers, labels)
    kw = dict(kind=kind, scale=32.0, margin=0.3, margin_type="arcface")
    straight = reference_value_and_grad(features, centers, labels, np.arange(K), **kw)
    exact = reference_value_and_grad(features, centers, labels, np.arange(K),
                                     margin_grad="exact", **kw)
    assert straight[0] == pytest.approx(exact[0], rel=1e-12)
    assert rel_err(straight[1], exact[1]) > 1e-2 and rel_err(straight[2], exact[2]) > 1e-2
    print(kind, rel_err(straight[1], exact[1]), rel_err(straight[2], exact[2]))


@pytest.mark.parametrize("mesh_name", ["1", "2", "4", "8"])
@pytest.mark.parametrize("kind", ["mlcd", "unicom"])
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("k,ratio", [(K, 1.0), (K, 0.3), (5, 1.0)])
def test_chunked_negatives_match_reference(devices, mesh_name, kind, chunk, k, ratio):
    """Negatives scored a few classes at a time (logits recomputed in the backward pass) give the
    reference loss and gradients, including the last, partly padded chunk, shards whose drawn
    classes are all a sample's positives, and (K = 5 on 8 devices) shards with no class at all."""
    mesh = mesh_for(mesh_name, devices)
    features, centers, labels = make_inputs(seed=21 + chunk, k=k)
    key = jax.random.key(4)
    kw = dict(scale=32.0, margin=0.3, margin_type="arcface")
    loss, metrics, gf, gc = sharded_value_and_grad(kind, mesh, features, centers, labels, key=key,
                                                   sample_ratio=ratio, chunk=chunk, **kw)
    drawn = np.asarray(head.sample_negative_classes(key, k, num_shards=mesh.size,
                                                    sample_ratio=ratio))
    drawn = drawn[drawn >= 0]
    ref_loss, ref_gf, ref_gc = reference_value_and_grad(features, centers, labels, drawn, kind=kind,
                                                        **kw)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    assert rel_err(gf, ref_gf) <= 1e-5
    assert rel_err(gc, ref_gc) <= 1e-5
    firsts = labels[:, :1] if kind == "unicom" else labels
    neg = [j for b in range(B) for j in drawn if j not in firsts[b]]
    np.testing.assert_allclose(metrics["neg_per_sample"], len(neg) / B)


def test_metrics_match_reference(devices):
    mesh = mesh_for("8", devices)
    features, centers, labels = make_inputs(seed=3)
    key = jax.random.key(1)
    _, metrics, _, _ = sharded_value_and_grad("mlcd", mesh, features, centers, labels, key=key,
                                              sample_ratio=0.5)
    drawn = np.asarray(head.sample_negative_classes(key, K, num_shards=8, sample_ratio=0.5))
    drawn = drawn[drawn >= 0]
    f64 = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1,
                                                          keepdims=True)
    cos = f64(features) @ f64(centers).T
    pos = [cos[b, y] for b in range(B) for y in labels[b] if y >= 0]
    neg = [cos[b, j] for b in range(B) for j in drawn if j not in labels[b]]
    np.testing.assert_allclose(metrics["pos_cos"], np.mean(pos), rtol=1e-5)
    np.testing.assert_allclose(metrics["neg_cos"], np.mean(neg), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["neg_per_sample"], len(neg) / B)
    # The two terms add up to the loss.
    loss, metrics, _, _ = sharded_value_and_grad("mlcd", mesh, features, centers, labels, key=key,
                                                 sample_ratio=0.5)
    np.testing.assert_allclose(metrics["pos_term"] + metrics["neg_term"], loss, rtol=1e-6)


def test_no_mesh_equals_one_device_mesh(devices):
    features, centers, labels = make_inputs(seed=5)
    key = jax.random.key(3)
    got = sharded_value_and_grad("mlcd", None, features, centers, labels, key=key, sample_ratio=0.3)
    want = sharded_value_and_grad("mlcd", mesh_for("1", devices), features, centers, labels,
                                  key=key, sample_ratio=0.3)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert_same_math(got[3], want[3])


def test_bfloat16_inputs_compute_in_float32(devices):
    features, centers, labels = make_inputs(seed=9)
    f16, c16 = jnp.asarray(features, jnp.bfloat16), jnp.asarray(centers, jnp.bfloat16)
    key = jax.random.key(0)
    loss, metrics, gf, gc = sharded_value_and_grad("mlcd", mesh_for("4", devices), f16, c16, labels,
                                                   key=key, sample_ratio=1.0)
    assert gf.dtype == jnp.bfloat16 and gc.dtype == jnp.bfloat16
    # Reference on the bf16-rounded inputs: only the input rounding differs from float32 math.
    ref_loss, _, _ = reference_value_and_grad(np.asarray(f16, np.float32),
                                              np.asarray(c16, np.float32),
                                              labels, np.arange(K), kind="mlcd", scale=32.0,
                                              margin=0.3, margin_type="arcface")
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert metrics["pos_cos"].dtype == jnp.float32


def test_gradients_reach_only_rows_that_were_used(devices):
    features, centers, labels = make_inputs(seed=11, b=4, l=1)
    key = jax.random.key(5)
    *_, gc = sharded_value_and_grad("mlcd", mesh_for("4", devices), features, centers, labels,
                                    key=key, sample_ratio=0.2)
    drawn = np.asarray(head.sample_negative_classes(key, K, num_shards=4, sample_ratio=0.2))
    used = set(drawn[drawn >= 0].tolist()) | set(labels[labels >= 0].tolist())
    touched = set(np.flatnonzero(np.abs(gc).sum(axis=1) > 0).tolist())
    assert touched == used
    assert len(used) < K  # the test means something: most rows are unused


def test_presharded_padded_centers_with_num_classes(devices):
    """The trainer keeps centers padded to a multiple of the device count: rows past K are
    ignored."""
    mesh = mesh_for("8", devices)
    features, centers, labels = make_inputs(seed=13)
    padded = np.concatenate([centers, 100 * np.ones((3, D), np.float32)])  # 40 rows, 3 of padding
    key = jax.random.key(2)
    want = sharded_value_and_grad("mlcd", mesh, features, centers, labels, key=key,
                                  sample_ratio=1.0)
    got = sharded_value_and_grad("mlcd", mesh, features, padded, labels, key=key, sample_ratio=1.0,
                                 num_classes=K)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    np.testing.assert_array_equal(got[3][K:], 0)


def test_loss_falls_when_features_move_to_their_centers(devices):
    """Sanity of the objective: aligned features score a far lower loss, higher pos_cos."""
    mesh = mesh_for("8", devices)
    features, centers, labels = make_inputs(seed=17)
    key = jax.random.key(0)
    far = sharded_value_and_grad("mlcd", mesh, features, centers, labels, key=key)
    near = sharded_value_and_grad("mlcd", mesh, centers[labels[:, 0]], centers, labels, key=key)
    assert near[0] < far[0]
    assert near[1]["pos_cos"] > far[1]["pos_cos"]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes, shards, ratio", [(37, 8, 0.3), (1000, 4, 0.1), (10, 1, 0.5),
                                                       (37, 8, 1.0), (9, 8, 0.6)])
def test_sampling_count_distinct_in_range(num_classes, shards, ratio):
    drawn = np.asarray(head.sample_negative_classes(jax.random.key(0), num_classes,
                                                    num_shards=shards, sample_ratio=ratio))
    local = -(-num_classes // shards)
    m = int(np.ceil(ratio * local))
    assert drawn.shape == (shards, m)
    for s in range(shards):
        row = drawn[s][drawn[s] >= 0]
        valid_here = max(0, min(local, num_classes - s * local))
        assert len(row) == min(m, valid_here)                        # count
        assert len(set(row.tolist())) == len(row)                    # distinct
        assert np.all((row >= s * local) & (row < min((s + 1) * local, num_classes)))  # own, no pad


def test_sampling_key_determines_draw():
    draw = lambda k: np.asarray(head.sample_negative_classes(jax.random.key(k), 1000, num_shards=4,
                                                             sample_ratio=0.1))
    np.testing.assert_array_equal(draw(1), draw(1))
    assert not np.array_equal(np.sort(draw(1), axis=1), np.sort(draw(2), axis=1))
    # Each shard folds its own index in: shards do not repeat one local pattern.
    local = draw(1) % 250
    assert not all(np.array_equal(np.sort(local[0]), np.sort(local[s])) for s in range(1, 4))


def test_sampling_is_uniform():
    num_classes, trials, ratio = 40, 2000, 0.3
    draws = jax.vmap(lambda k: head.sample_negative_classes(k, num_classes, num_shards=4,
                                                            sample_ratio=ratio))(
        jax.random.split(jax.random.key(0), trials))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=num_classes)
    expected, sd = trials * ratio, np.sqrt(trials * ratio * (1 - ratio))
    assert np.all(np.abs(counts - expected) < 5 * sd), counts


def test_positives_never_count_as_negatives(devices):
    """With r = 1 every class is drawn: each sample has exactly K − |P| negatives."""
    features, centers, labels = make_inputs(seed=19)
    _, metrics, _, _ = sharded_value_and_grad("mlcd", mesh_for("8", devices), features, centers,
                                              labels, key=jax.random.key(0), sample_ratio=1.0)
    expected = np.mean([K - np.sum(labels[b] >= 0) for b in range(B)])
    np.testing.assert_allclose(metrics["neg_per_sample"], expected)
    _, metrics, _, _ = sharded_value_and_grad("unicom", mesh_for("8", devices), features, centers,
                                              labels, key=jax.random.key(0), sample_ratio=1.0)
    np.testing.assert_allclose(metrics["neg_per_sample"], K - 1)


def test_unicom_accepts_1d_labels(devices):
    features, centers, labels = make_inputs(seed=23)
    key = jax.random.key(4)
    one_d = head.unicom_loss(features, centers, labels[:, 0], key=key, sample_ratio=1.0)
    two_d = head.unicom_loss(features, centers, labels, key=key, sample_ratio=1.0)
    assert float(one_d[0]) == float(two_d[0])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(centers=np.zeros((K, D + 1), np.float32)), "D = 12 but centers have D = 13"),
    (dict(labels=np.zeros((B + 1, L), np.int32)), "labels must be"),
    (dict(labels=np.zeros((B, L), np.float32)), "integer class ids"),
    (dict(margin_type="sphereface"), "margin_type"),
    (dict(sample_ratio=0.0), "sample_ratio"),
    (dict(sample_ratio=1.5), "sample_ratio"),
    (dict(num_classes=K + 1), "num_classes"),
    (dict(chunk=-1), "chunk"),  # 0 or None: automatic
])
def test_bad_arguments_raise_clear_errors(change, message):
    features, centers, labels = make_inputs()
    args = dict(features=features, centers=centers, labels=labels, key=jax.random.key(0)) | change
    with pytest.raises(ValueError, match=message):
        head.mlcd_loss(**args)


def test_batch_not_divisible_by_mesh(devices):
    features, centers, labels = make_inputs(b=12)
    with pytest.raises(ValueError, match="global batch 12 is not divisible by the 8 batch shards"):
        head.mlcd_loss(features, centers, labels, key=jax.random.key(0),
                       mesh=mesh_lib.make_mesh([("data", 8)]))


@pytest.mark.parametrize("mesh_name", ["1", "2", "4", "8"])
@pytest.mark.parametrize("kind", ["mlcd", "unicom"])
def test_bfloat16_matmuls_stay_near_the_float64_reference(devices, mesh_name, kind):
    """The negatives' matmuls with bf16 inputs (float32 accumulation): loss and gradients within
    bf16's rounding (2^-9 relative per input) of the float64 reference, at a realistic width."""
    mesh = mesh_for(mesh_name, devices)
    features, centers, labels = make_inputs(seed=5, d=256, k=101)
    # Farther from their centers than make_inputs puts them: a loss well away from 0.
    features += 1.5 * np.random.default_rng(6).normal(size=features.shape).astype(np.float32)
    key = jax.random.key(3)
    kw = dict(scale=32.0, margin=0.3, margin_type="arcface")
    loss, _, gf, gc = sharded_value_and_grad(kind, mesh, features, centers, labels, key=key,
                                             sample_ratio=0.5, matmul_dtype="bfloat16", **kw)
    drawn = np.asarray(head.sample_negative_classes(key, 101, num_shards=mesh.size,
                                                    sample_ratio=0.5))
    ref_loss, ref_gf, ref_gc = reference_value_and_grad(features, centers, labels,
                                                        drawn[drawn >= 0], kind=kind, **kw)
    print(kind, mesh_name, abs(loss - ref_loss) / abs(ref_loss), rel_err(gf, ref_gf),
          rel_err(gc, ref_gc))
    assert abs(loss - ref_loss) <= 2e-3 * abs(ref_loss), (loss, ref_loss)
    assert rel_err(gf, ref_gf) <= 1e-2  # seen: ≤ 2e-3 (loss ≤ 6e-4)
    assert rel_err(gc, ref_gc) <= 1e-2
    float32 = sharded_value_and_grad(kind, mesh, features, centers, labels, key=key,
                                     sample_ratio=0.5, **kw)
    assert float32[0] != loss  # the bf16 path was taken (float32 is exact to 1e-5 above)
