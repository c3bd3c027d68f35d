"""The one optimizer of every trainer: AdamW with linear warm-up + cosine decay, global-norm
clipping, decoupled weight decay on matrices (and class centers) only, and a learning-rate
multiplier for the class centers where there are any (the MLCD trainer; LiT's text tower has
none)."""

from __future__ import annotations

import jax
import ml_collections
import optax


def schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """`config.optim`'s learning rate by step."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.end_lr_factor)


def decay_mask(params):
    """Weight decay on matrices (kernels) and the class centers; not on norms, biases,
    embeddings, temperatures."""
    def decays(path, _):
        names = [getattr(k, "key", None) for k in path]
        return names[0] == "centers" or names[-1] == "kernel"
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, *,
                   centers_lr_mult: float | None = None) -> optax.GradientTransformation:
    """clip → AdamW, from `config.optim`; with `centers_lr_mult` (params {"encoder", "centers"})
    → the centers' updates × it (AdamW's update is −lr·(…), so scaling it equals AdamW with
    lr × lr_mult for the centers). Adam's moments mirror the params tree exactly."""
    stages = [
        optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity(),
        optax.adamw(schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay, mask=decay_mask)]
    if centers_lr_mult is not None:
        stages.append(optax.masked(optax.scale(centers_lr_mult),
                                   {"encoder": False, "centers": True}))
    return optax.chain(*stages)
