import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlcd_jax import config as config_lib, optim
from mlcd_jax.models import vit


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
