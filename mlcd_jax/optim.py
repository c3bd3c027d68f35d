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
    """Weight decay on matrices (kernels) and the class centers; not on norms, biases, embeddings."""
    def decays(path, _):
        names = [getattr(k, "key", None) for k in path]
        return names[0] == "centers" or names[-1] == "kernel"
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(c, total_steps)

    def adamw(learning_rate):
        return optax.adamw(learning_rate, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                           weight_decay=c.optim.weight_decay, mask=decay_mask)

    return optax.chain(
        optax.clip_by_global_norm(c.optim.clip_norm) if c.optim.clip_norm else optax.identity(),
        optax.multi_transform(
            {"encoder": adamw(lr), "centers": adamw(lambda step: lr(step) * c.head.lr_mult)},
            {"encoder": "encoder", "centers": "centers"}),  # a prefix of the params tree
    )
