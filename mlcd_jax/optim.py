"""AdamW with linear warm-up + cosine decay, global-norm clipping, decoupled weight decay on
matrices only, and a learning-rate multiplier for the class centers."""

from __future__ import annotations

import jax
import ml_collections
import optax


def schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = min(c.optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.optim.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=c.optim.lr * c.optim.end_lr_factor)


def decay_mask(params):
    """Weight decay on matrices (kernels) and the class centers; not on norms, biases,
    embeddings."""
    def decays(path, _):
        names = [getattr(k, "key", None) for k in path]
        return names[0] == "centers" or names[-1] == "kernel"
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """clip → AdamW → centers' updates × lr_mult (AdamW's update is −lr·(…), so scaling it equals
    AdamW with lr × lr_mult for the centers). Adam's moments mirror the params tree exactly."""
    return optax.chain(
        optax.clip_by_global_norm(c.optim.clip_norm) if c.optim.clip_norm else optax.identity(),
        optax.adamw(schedule(c, total_steps), b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                    weight_decay=c.optim.weight_decay, mask=decay_mask),
        optax.masked(optax.scale(c.head.lr_mult), {"encoder": False, "centers": True}),
    )
