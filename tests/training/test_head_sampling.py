"""The authors' sampler and the group's multi-label variant, against an independent dense float64
reference handed the same draw, on 1, 2, 4 and 8 devices: Partial FC v2's "batch" negatives
(the batch's positives always drawn; only positives when they alone exceed the draw), the negative
filter (insightface's interclass filtering), and OneVision-Encoder's multi_softmax (a
margin-softmax per label column, each column with its own draw)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import sharded_head as head

from helpers.heads import make_inputs as head_inputs

B, L = 16, 3  # as test_head's inputs
S, M = 32.0, 0.3


def make_inputs(seed, k):
    return head_inputs(seed=seed, k=k)


def mesh_of(n, devices):
    return mesh_lib.make_mesh([("data", n)], devices[:n])


def reference(features, centers, terms, *, margin_type="arcface", threshold=1.0):
    """Float64 loss and gradients of the mean over `terms`, each (b, positives, negatives, kind):
    kind "mlcd": log(1 + Σ_P exp(−p)) + log(1 + Σ_N exp(n)); "softmax": −p + log(exp(p) +
    Σ_N exp(n)) for its one positive. p = s·cos(θ + m) (ArcFace) or s·(cos θ − m), with the
    gradient of s·cos θ (straight-through, the authors' Partial FC); n = s·cos, or 0 with no
    gradient where cos > threshold."""
    with jax.enable_x64(True):
        f = jnp.asarray(np.asarray(features, np.float64))
        c = jnp.asarray(np.asarray(centers, np.float64))

        def cosines(f, c):
            return ((f / jnp.linalg.norm(f, axis=1, keepdims=True))
                    @ (c / jnp.linalg.norm(c, axis=1, keepdims=True)).T)

        def loss_of(cos):
            margined = (S * jnp.cos(jnp.arccos(jnp.clip(cos, -1, 1)) + M)
                        if margin_type == "arcface" else S * (cos - M))
            pos = S * cos + jax.lax.stop_gradient(margined - S * cos)
            neg = jnp.where(jax.lax.stop_gradient(cos) > threshold, 0.0, S * cos)
            values = []
            for b, positives, negatives, kind in terms:
                p = pos[b, jnp.array(positives, dtype=int)]
                n = neg[b, jnp.array(negatives, dtype=int)]
                if kind == "mlcd":
                    values.append(jnp.log1p(jnp.sum(jnp.exp(-p))) + jnp.log1p(jnp.sum(jnp.exp(n))))
                else:
                    values.append(-p[0] + jnp.log(jnp.exp(p[0]) + jnp.sum(jnp.exp(n))))
            return jnp.mean(jnp.stack(values))

        cos, pullback = jax.vjp(cosines, f, c)
        loss, d_cos = jax.value_and_grad(loss_of)(cos)
        gf, gc = pullback(d_cos)
        return float(loss), np.asarray(gf), np.asarray(gc)


def sample_terms(labels, drawn, kind):
    """Each sample's term: its positives (UNICOM: its first), the draw minus them."""
    terms = []
    for b in range(len(labels)):
        positives = [int(y) for y in labels[b] if y >= 0]
        if kind == "unicom":
            positives = positives[:1]
        negatives = [int(j) for j in drawn if j >= 0 and j not in positives]
        terms.append((b, positives, negatives, "mlcd" if kind == "mlcd" else "softmax"))
    return terms


def sharded(loss_fn, mesh, features, centers, labels, **kw):
    features = jax.device_put(features, mesh_lib.batch_sharding(mesh))
    centers = jax.device_put(jnp.asarray(centers), mesh_lib.replicated(mesh))
    fn = functools.partial(loss_fn, mesh=mesh, **kw)
    grad_fn = jax.jit(jax.value_and_grad(lambda f, c: fn(f, c, labels), argnums=(0, 1),
                                         has_aux=True))
    (loss, metrics), (gf, gc) = grad_fn(features, centers)
    return float(loss), metrics, np.asarray(gf), np.asarray(gc)


def assert_close(got, want):
    loss, _, gf, gc = got
    ref_loss, ref_gf, ref_gc = want
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    for x, ref in ((gf, ref_gf), (gc, ref_gc)):  # tolerance relative to the gradient's size
        assert np.linalg.norm(x - ref) <= 1e-5 * np.linalg.norm(ref), (x, ref)


LOSS_FN = {"mlcd": head.mlcd_loss, "unicom": head.unicom_loss}


# ---------------------------------------------------------------------------------------------
# The draw
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 2, 4, 8])
@pytest.mark.parametrize("ratio", [0.5, 0.05])
def test_batch_draw_keeps_every_positive_and_fills_to_the_draw_size(shards, ratio):
    """Partial FC v2's rule on every shard: the batch's positives (-1 padding aside) are all
    drawn; the rest of the m = ceil(r·K_local) slots are other classes, distinct; where the
    positives alone exceed m (r = 0.05), the draw is exactly the positives."""
    k = 101
    _, _, labels = make_inputs(seed=shards, k=k)
    drawn = np.asarray(head.sample_negative_classes(jax.random.key(3), k, num_shards=shards,
                                                    sample_ratio=ratio, negatives="batch",
                                                    labels=labels))
    num_local = -(-k // shards)
    m = head.num_sampled(num_local, ratio)
    positives = set(labels[labels >= 0].tolist())
    exceeded = 0
    for s in range(shards):
        mine = {y for y in positives if s * num_local <= y < (s + 1) * num_local}
        real = min(num_local, max(0, k - s * num_local))
        got = [int(j) for j in drawn[s] if j >= 0]
        assert len(got) == len(set(got)) and all(s * num_local <= j < s * num_local + real
                                                 for j in got)
        assert mine <= set(got)
        if len(mine) > m:
            exceeded += 1
            assert set(got) == mine
        else:
            assert len(got) == min(m, real)
    assert exceeded > 0 if ratio == 0.05 else exceeded == 0  # both cases are met


def test_uniform_draw_ignores_the_batch_and_is_unchanged():
    k, key = 101, jax.random.key(5)
    _, _, labels = make_inputs(seed=0, k=k)
    uniform = np.asarray(head.sample_negative_classes(key, k, num_shards=4, sample_ratio=0.2))
    again = np.asarray(head.sample_negative_classes(key, k, num_shards=4, sample_ratio=0.2,
                                                    negatives="uniform", labels=labels))
    np.testing.assert_array_equal(uniform, again)
    batch = np.asarray(head.sample_negative_classes(key, k, num_shards=4, sample_ratio=0.2,
                                                    negatives="batch", labels=labels))
    assert not np.array_equal(np.sort(uniform, axis=1), np.sort(batch[:, :uniform.shape[1]],
                                                                axis=1))


# ---------------------------------------------------------------------------------------------
# Losses against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["mlcd", "unicom"])
@pytest.mark.parametrize("ratio, chunk", [(0.5, 0), (0.05, 3)])
def test_batch_negatives_match_reference(devices, n, kind, ratio, chunk):
    """Every sample's negatives are the batch draw minus its own positives: the other samples'
    positives are always among them. r = 0.05: the positives exceed the draw on every shard
    (only they are scored); chunk 3: the scoring loop stops at the last used chunk."""
    k = 101
    features, centers, labels = make_inputs(seed=10 + n, k=k)
    key = jax.random.key(11)
    got = sharded(LOSS_FN[kind], mesh_of(n, devices), features, centers, labels, key=key,
                  sample_ratio=ratio, negatives="batch", chunk=chunk)
    used = labels[:, :1] if kind == "unicom" else labels
    drawn = np.asarray(head.sample_negative_classes(key, k, num_shards=n, sample_ratio=ratio,
                                                    negatives="batch", labels=used)).ravel()
    assert set(used[used >= 0].tolist()) <= set(drawn.tolist())
    assert_close(got, reference(features, centers, sample_terms(labels, drawn, kind)))
    neg = sum(len(t[2]) for t in sample_terms(labels, drawn, kind))
    np.testing.assert_allclose(got[1]["neg_per_sample"], neg / B)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["mlcd", "unicom"])
@pytest.mark.parametrize("negatives", ["uniform", "batch"])
def test_negative_filter_matches_reference(devices, n, kind, negatives):
    """A negative above the threshold counts as cosine 0 with no gradient; the sample's own
    positives are never filtered (they are not negatives)."""
    k = 37
    features, centers, labels = make_inputs(seed=20 + n, k=k)
    centers[5] = centers[labels[0, 0]] + 0.05  # a near-duplicate of a positive: filtered
    key, threshold = jax.random.key(2), 0.3
    got = sharded(LOSS_FN[kind], mesh_of(n, devices), features, centers, labels, key=key,
                  sample_ratio=0.6, negatives=negatives, negative_filter=threshold)
    drawn = np.asarray(head.sample_negative_classes(
        key, k, num_shards=n, sample_ratio=0.6, negatives=negatives,
        labels=labels[:, :1] if kind == "unicom" else labels)).ravel()
    terms = sample_terms(labels, drawn, kind)
    want = reference(features, centers, terms, threshold=threshold)
    assert_close(got, want)
    unfiltered = reference(features, centers, terms)
    assert abs(unfiltered[0] - want[0]) > 1e-3 * abs(want[0])  # the filter changed something


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("negatives", ["uniform", "batch"])
@pytest.mark.parametrize("columns, margin_type", [(2, "arcface"), (0, "cosface")])
def test_multi_softmax_matches_reference(devices, n, negatives, columns, margin_type):
    """OneVision-Encoder's loss: per sample `columns` of its label columns (its real labels
    first), each a margin-softmax over its own column's draw, averaged over the (sample, column)
    pairs that have a label; a column's negatives are its draw minus that column's target."""
    k = 53
    features, centers, labels = make_inputs(seed=30 + n, k=k)
    key = jax.random.key(8)
    got = sharded(head.multi_softmax_loss, mesh_of(n, devices), features, centers, labels,
                  key=key, sample_ratio=0.3, negatives=negatives, label_columns=columns,
                  margin_type=margin_type)
    column_key, draw_key = jax.random.split(key)
    chosen = np.asarray(head.label_columns(column_key, jnp.asarray(labels), columns))
    assert chosen.shape == (B, columns or L)
    for b in range(B):  # a sample's real labels are taken before its padding
        real, picked = set(labels[b][labels[b] >= 0]), chosen[b][chosen[b] >= 0]
        assert set(picked) <= real and len(set(picked)) == len(picked) == min(len(real),
                                                                              chosen.shape[1])
    terms = []
    for j in range(chosen.shape[1]):
        drawn = np.asarray(head.sample_negative_classes(
            jax.random.fold_in(draw_key, j), k, num_shards=n, sample_ratio=0.3,
            negatives=negatives, labels=chosen[:, j:j + 1])).ravel()
        for b in range(B):
            if chosen[b, j] >= 0:
                target = int(chosen[b, j])
                terms.append((b, [target], [int(x) for x in drawn if x >= 0 and x != target],
                              "softmax"))
    assert_close(got, reference(features, centers, terms, margin_type=margin_type))


def test_the_same_key_gives_the_same_draw_on_any_mesh_shape_with_the_same_shards(devices):
    """8 class shards as (data 8), (data 4, model 2) or (data 2, fsdp 2, model 2): one draw."""
    features, centers, labels = make_inputs(seed=4, k=101)
    results = []
    for spec in ([("data", 8)], [("data", 4), ("model", 2)],
                 [("data", 2), ("fsdp", 2), ("model", 2)]):
        mesh = mesh_lib.make_mesh(spec, devices)
        results.append(sharded(head.mlcd_loss, mesh, features, centers, labels,
                               key=jax.random.key(6), sample_ratio=0.2, negatives="batch")[0])
    assert max(results) - min(results) <= 1e-6 * abs(results[0]), results


def test_rows_used_are_the_draw_and_the_positives(devices):
    """center_update="sparse": the head says which center rows it used (drawn or positive),
    laid out as the centers; the gradient reaches no other row."""
    k = 101
    features, centers, labels = make_inputs(seed=7, k=k)
    key = jax.random.key(9)
    for negatives in ("uniform", "batch"):
        loss, metrics, _, gc = sharded(head.mlcd_loss, mesh_of(8, devices), features, centers,
                                       labels, key=key, sample_ratio=0.1, negatives=negatives,
                                       center_update="sparse")
        drawn = np.asarray(head.sample_negative_classes(key, k, num_shards=8, sample_ratio=0.1,
                                                        negatives=negatives, labels=labels))
        want = np.zeros(mesh_lib.padded_num_classes(k, 8), bool)
        want[drawn[drawn >= 0]] = True
        want[labels[labels >= 0]] = True
        np.testing.assert_array_equal(np.asarray(metrics["rows_used"]) > 0, want)
        assert not np.abs(gc[~want[:k]]).any()
        assert want.sum() < k  # a sparse draw: most rows unused
