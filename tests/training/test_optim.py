
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlcd_jax.config import schema as config_lib
from mlcd_jax.models import vit
from mlcd_jax.training import optim


def params():
    model = vit.ViT(vit.vit_config("micro", pos="learned", embed_dim=8), rngs=nnx.Rngs(0))
    return {"encoder": nnx.to_pure_dict(nnx.state(model)), "centers": jnp.ones((10, 8))}


def test_weight_decay_only_on_matrices_and_centers():
    mask = optim.decay_mask(params())
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = {k for k, v in flat.items() if v}
    assert "['centers']" in decayed
    assert "['encoder']['blocks']['fc1']['kernel']" in decayed
    assert "['encoder']['patch_embedding']['kernel']" in decayed
    assert "['encoder']['projection']['kernel']" in decayed
    for name in ("['blocks']['fc1']['bias']", "['blocks']['layer_norm1']['scale']",
                 "['class_embedding']", "['position_embedding']", "['pre_layrnorm']['bias']"):
        assert not flat["['encoder']" + name], name


def test_centers_lr_multiplier_and_schedule():
    c = config_lib.base_config()
    c.optim.warmup_steps, c.optim.lr, c.head.lr_mult = 2, 1e-2, 0.0
    tx = optim.make_optimizer(c.optim, total_steps=10, centers_lr_mult=c.head.lr_mult)
    p = params()
    grads = jax.tree.map(jnp.ones_like, p)
    state = tx.init(p)
    for _ in range(3):  # step 0 has lr 0 (warm-up starts at 0)
        updates, state = tx.update(grads, state, p)
        p2 = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(p2["centers"], p["centers"])  # lr × 0: frozen
    assert not np.array_equal(p2["encoder"]["blocks"]["fc1"]["kernel"],
                              p["encoder"]["blocks"]["fc1"]["kernel"])
    lr = optim.schedule(c.optim, 10)
    assert float(lr(0)) == 0.0 and float(lr(2)) == np.float32(1e-2) and float(lr(10)) == 0.0


def reference_sparse_adamw(params, grads_and_used, *, lr, b1, b2, eps, wd, lr_mult):
    """Partial FC v1's update in float64, written out: per row, only at the steps that use it,
    its own moments and its own step count t for the bias corrections."""
    p = np.asarray(params, np.float64).copy()
    mu, nu, t = np.zeros_like(p), np.zeros_like(p), np.zeros(len(p), int)
    for step, (g, used) in enumerate(grads_and_used):
        g = np.asarray(g, np.float64)
        for r in np.flatnonzero(used):
            t[r] += 1
            mu[r] = b1 * mu[r] + (1 - b1) * g[r]
            nu[r] = b2 * nu[r] + (1 - b2) * g[r] ** 2
            update = (mu[r] / (1 - b1 ** t[r])) / (np.sqrt(nu[r] / (1 - b2 ** t[r])) + eps)
            p[r] -= lr(step) * lr_mult * (update + wd * p[r])
    return p, mu, nu, t


def test_sparse_rows_adamw_matches_reference_and_leaves_other_rows_bit_identical():
    rng = np.random.default_rng(0)
    k, d, steps = 20, 6, 5
    params = jnp.asarray(rng.normal(size=(k, d)), jnp.float32)
    history = [(rng.normal(size=(k, d)).astype(np.float32), rng.random(k) < 0.3)
               for _ in range(steps)]
    history[0][1][:] = False
    history[0][1][[1, 2]] = True
    never = np.flatnonzero(~np.any([u for _, u in history], axis=0))
    assert never.size  # some rows are never used
    lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    kw = dict(b1=0.9, b2=0.98, eps=1e-6)
    init, update = optim.sparse_rows_adamw(lr, weight_decay=0.1, lr_mult=0.5, **kw)
    state, p = init(params), params
    for g, used in history:
        u, state = update(jnp.asarray(g), state, p, jnp.asarray(used, jnp.float32))
        p = optax.apply_updates(p, u)
    want, mu, nu, t = reference_sparse_adamw(params, history, lr=lr, wd=0.1, lr_mult=0.5, **kw)
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.centers_mu, mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.centers_nu, nu, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(state.centers_count[:, 0], t)
    np.testing.assert_array_equal(np.asarray(p)[never], np.asarray(params)[never])  # to the bit
    assert not np.asarray(state.centers_mu)[never].any()
    assert int(state.step) == steps


def test_sparse_with_every_row_used_is_adamw():
    rng = np.random.default_rng(1)
    params = {"encoder": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
              "centers": jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)}
    c = config_lib.base_config()
    c.optim.warmup_steps, c.optim.lr = 2, 1e-2
    dense = optim.make_optimizer(c.optim, 10, centers_lr_mult=1.0)
    sparse = optim.make_optimizer(c.optim, 10, centers_lr_mult=1.0, sparse_centers=True)
    pd, ps, sd, ss = params, params, dense.init(params), sparse.init(params)
    for _ in range(4):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        ud, sd = dense.update(grads, sd, pd)
        us, ss = sparse.update(grads, ss, ps, rows_used=jnp.ones(10))
        pd, ps = optax.apply_updates(pd, ud), optax.apply_updates(ps, us)
    for a, b in zip(jax.tree.leaves(pd), jax.tree.leaves(ps)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def sparse_tiny_config(center_update):
    from mlcd_jax.config.presets import test_tiny
    c = test_tiny.get_config()
    c.head.num_classes, c.head.sample_ratio = 4000, 0.02
    c.head.negatives, c.head.center_update = "batch", center_update
    c.optim.warmup_steps = 0  # the first step moves what it uses (a warm-up starts at lr 0)
    return c


def test_sparse_centers_in_the_train_step(devices):
    """The trainer's own step on 8 devices: after two steps only the center rows used (drawn or
    positive) moved, each counted once per step that used it; every other row, and its moments,
    is the initial one to the bit (weight decay too touches only used rows). The compiled step
    holds no K × D temporary beyond what the dense one holds."""
    from mlcd_jax.runtime import mesh as mesh_lib
    from mlcd_jax.training import input as input_lib, step as step_lib, validation
    mesh = mesh_lib.make_mesh([("data", -1)], devices)
    temporaries = {}
    for update in ("dense", "sparse"):
        c = sparse_tiny_config(update)
        built = step_lib.build(c, mesh, 10, *validation.validate(c, 8))
        compiled = built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
        temporaries[update] = compiled.memory_analysis().temp_size_in_bytes
    print("per-device temporaries, dense vs sparse:", temporaries)
    k_local_bytes = mesh_lib.padded_num_classes(4000, 8) // 8 * 32 * 4
    assert temporaries["sparse"] <= temporaries["dense"] + k_local_bytes // 2, temporaries

    state = jax.jit(built.init, out_shardings=built.shardings)(jax.random.key(0))
    first = np.asarray(state["params"]["centers"])
    inputs = input_lib.make_train_input(c, built.batch_sharding)
    for _ in range(2):
        state, _ = compiled(state, inputs.next()[0])
    after = np.asarray(state["params"]["centers"])
    rows = state["opt_state"][2]
    count = np.asarray(rows.centers_count)[:, 0]
    moved = np.any(after != first, axis=1)
    np.testing.assert_array_equal(moved, count > 0)
    assert 0 < moved.sum() < 0.5 * len(moved) and count.max() <= 2
    assert not np.asarray(rows.centers_mu)[count == 0].any()
    assert not np.asarray(rows.centers_nu)[count == 0].any()
    assert len(rows.centers_count.sharding.device_set) == 8  # split as the centers
