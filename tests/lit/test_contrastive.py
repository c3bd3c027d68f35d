"""The contrastive losses against a dense float64 reference written here, on 1, 2, 4 and 8
devices, chunked and not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax.lit import contrastive
from mlcd_jax.runtime import mesh as mesh_lib

from helpers.numerics import assert_same_math

B, D = 16, 12


def reference(x, y, log_scale, bias, kind):
    """The paper's formulas on the whole B × B matrix (float64, jax with x64 for gradients)."""
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
    logits = jnp.exp(log_scale) * x @ y.T
    if kind == "clip":
        diag = jnp.diag(logits)
        rows = jax.scipy.special.logsumexp(logits, axis=1) - diag
        cols = jax.scipy.special.logsumexp(logits, axis=0) - diag
        return 0.5 * (rows.mean() + cols.mean())
    logits = logits + bias
    signs = 2 * jnp.eye(len(x)) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / len(x)


def reference_value_and_grad(x, y, log_scale, bias, kind):
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, y, log_scale, bias)]
        fn = functools.partial(reference, kind=kind)
        value, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*args)
        return float(value), [np.asarray(g) for g in grads]


def inputs(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = (x + 0.8 * rng.normal(size=(B, D))).astype(np.float32)  # pairs are similar
    return x, y, np.float32(np.log(10.0)), np.float32(-3.0)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_sharded_chunked_loss_equals_float64_reference(devices, n, kind, chunk):
    x, y, log_scale, bias = inputs(seed=n)
    mesh = mesh_lib.make_mesh([("data", n)], devices[:n])
    sharding = mesh_lib.batch_sharding(mesh)
    fn = jax.jit(jax.value_and_grad(
        lambda x, y, t, b: contrastive.loss(x, y, t, b, kind=kind, chunk=chunk, mesh=mesh),
        argnums=(0, 1, 2, 3)))
    value, grads = fn(jax.device_put(x, sharding), jax.device_put(y, sharding),
                      jnp.asarray(log_scale), jnp.asarray(bias))
    want, want_grads = reference_value_and_grad(x, y, log_scale, bias, kind)
    assert abs(float(value) - want) <= 1e-5 * abs(want), (float(value), want)
    if kind == "clip":
        want_grads[3] = np.zeros_like(want_grads[3])  # CLIP has no bias
    assert_same_math([np.asarray(g) for g in grads], want_grads, rtol=1e-5)


def test_no_mesh_equals_mesh_and_bad_inputs(devices):
    x, y, t, b = inputs(seed=0)
    alone = contrastive.loss(jnp.asarray(x), jnp.asarray(y), t, b, kind="siglip")
    mesh = mesh_lib.make_mesh([("data", 4), ("model", 2)], devices)
    meshed = contrastive.loss(jnp.asarray(x), jnp.asarray(y), t, b, kind="siglip", mesh=mesh)
    np.testing.assert_allclose(float(alone), float(meshed), rtol=1e-5)
    with pytest.raises(ValueError, match="kind must be one of"):
        contrastive.loss(jnp.asarray(x), jnp.asarray(y), t, kind="infonce")
    with pytest.raises(ValueError, match="one shape"):
        contrastive.loss(jnp.asarray(x), jnp.asarray(y[:3]), t)
