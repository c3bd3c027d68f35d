"""Several heads in one step (RICE's region heads beside the image head): a region head's padded
and unlabelled rows count for nothing (`HeadConfig.skip_unlabelled`), on 1, 2, 4 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax import head, mesh as mesh_lib


@pytest.mark.parametrize("loss", ["mlcd", "unicom"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_unlabelled_rows_count_for_nothing(devices, n, loss):
    """At r = 1 (every class scored: no randomness), a batch with unlabelled rows (all labels −1)
    under skip_unlabelled has the loss, metrics and gradients of the labelled rows alone; the
    unlabelled rows' gradient is 0."""
    rng = np.random.default_rng(n)
    k, d, l = 37, 16, 3
    labelled = rng.normal(size=(8, d)).astype(np.float32)
    labels = rng.integers(0, k, size=(8, l)).astype(np.int32)
    labels[:, 1:][rng.random((8, l - 1)) < 0.4] = -1
    padding = rng.normal(size=(8, d)).astype(np.float32)
    features = np.concatenate([labelled, padding])
    all_labels = np.concatenate([labels, np.full((8, l), -1, np.int32)])
    order = rng.permutation(16)  # padding spread among the labelled rows
    centers = rng.normal(size=(k, d)).astype(np.float32)
    mesh = mesh_lib.make_mesh([("data", -1)], devices[:n])
    cfg = head.HeadConfig(loss, sample_ratio=1.0, skip_unlabelled=True)

    def run(features, labels, cfg):
        f = lambda x, c: head.loss(x, c, labels, key=jax.random.key(0), cfg=cfg, mesh=mesh)
        (value, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
            jnp.asarray(features), jnp.asarray(centers))
        return float(value), metrics, [np.asarray(g) for g in grads]

    mixed = run(features[order], all_labels[order], cfg)
    alone = run(labelled, labels, head.HeadConfig(loss, sample_ratio=1.0))
    assert mixed[0] == pytest.approx(alone[0], rel=1e-6)
    for name in ("pos_cos", "pos_term", "neg_term", "pos_logit", "log_partition"):
        if name in alone[1]:
            assert float(mixed[1][name]) == pytest.approx(float(alone[1][name]), rel=1e-5,
                                                          abs=1e-6), name
    back = np.argsort(order)  # the gradient of each row where it was
    grad_features = mixed[2][0][back]
    scale = np.abs(alone[2][0]).max()
    np.testing.assert_allclose(grad_features[:8], alone[2][0], atol=1e-5 * scale)
    assert not grad_features[8:].any()
    np.testing.assert_allclose(mixed[2][1], alone[2][1], atol=1e-5 * np.abs(alone[2][1]).max())
    if n == 1:  # off, the same rows count (the image head's mean, as it was): another loss
        assert run(features[order], all_labels[order],
                   head.HeadConfig(loss, sample_ratio=1.0))[0] != pytest.approx(alone[0],
                                                                                rel=1e-3)
