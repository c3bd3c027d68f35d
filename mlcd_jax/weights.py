"""Encoder weights in and out, wherever they are: a training workdir (a step of its checkpoints),
our model dir (vit_config.json + params/), or a transformers checkpoint dir (config.json +
*.safetensors: MLCDVisionModel / CLIPVisionModel). Every command that takes a model goes through
`load_encoder`, so each of them accepts all three.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
from flax import nnx

from mlcd_jax.models import vit


def save_model_dir(model: vit.ViT, path) -> pathlib.Path:
    """Our own format: vit_config.json + an orbax checkpoint of the parameters."""
    import orbax.checkpoint as ocp
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vit_config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", nnx.to_pure_dict(nnx.state(model)), force=True)
    return path


def load_model_dir(path, **overrides) -> vit.ViT:
    import orbax.checkpoint as ocp
    path = pathlib.Path(path).absolute()
    config_file = path / "vit_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a model directory written by "
                                "`python -m mlcd_jax.interop.hf import` (vit_config.json + "
                                "params/)")
    fields = json.loads(config_file.read_text())
    if isinstance(fields.get("image_size"), list):
        fields["image_size"] = tuple(fields["image_size"])
    try:
        cfg = vit.ViTConfig(**(fields | overrides))
    except TypeError as e:  # a field ViTConfig does not have
        raise ValueError(f"{config_file}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    target = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(vit.ViT(cfg, rngs=nnx.Rngs(0)))))
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(path / "params", target)
    return vit.with_params(cfg, params)


def load_from_workdir(workdir, step: int | None = None) -> tuple[vit.ViT, int]:
    """(encoder, step) of a training workdir: its resolved config.json and checkpoint `step`
    (default: the latest), checksums verified, restored onto this process's first device."""
    import ml_collections

    from mlcd_jax import checkpoint, config as config_lib
    workdir = pathlib.Path(workdir).absolute()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a training workdir")
    c = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    try:
        steps = ckpt.steps()
        step = (steps[-1] if steps else None) if step is None else step
        if step is None or step not in steps:
            raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                                    f"{workdir / 'checkpoints'} (have {steps})")
        # The run may have used another device count: every array onto this process's first
        # device, shapes as stored.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              ckpt.metadata(step))
        state, _ = ckpt.restore(target, step)
    finally:
        ckpt.close()
    return vit.with_params(config_lib.vit_config(c), state["params"]["encoder"]), step


def load_encoder(path, step: int | None = None) -> tuple[vit.ViT, str]:
    """(encoder, what it is) from a training workdir (step `step`, default the latest), our model
    dir, or a transformers checkpoint dir."""
    from mlcd_jax.interop import hf
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        model, step = load_from_workdir(path, step)
        return model, f"{path} (step {step})"
    if step is not None:
        raise ValueError(f"--step {step}: {path} is not a training workdir (no checkpoints/)")
    if (path / "vit_config.json").is_file():
        return load_model_dir(path), str(path)
    if (path / "config.json").is_file():
        return hf.load_vision_model(path), str(path)
    raise FileNotFoundError(f"{path}: neither a training workdir (config.json + checkpoints/), our "
                            "model dir (vit_config.json) nor a transformers checkpoint "
                            "(config.json + *.safetensors)")


def init_from(path, encoder, shardings, step: int | None = None):
    """`encoder` (a pure dict of sharded arrays) with every parameter the model at `path` has
    (any form `load_encoder` takes, e.g. a transformers MLCD model to continue pretraining);
    others (a new projection) stay. Returns (encoder, arrays taken, arrays in all)."""
    model, _ = load_encoder(path, step)
    loaded = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0])
    taken = []

    def take(key_path, current, sharding):
        if key_path not in loaded:
            return current
        name = jax.tree_util.keystr(key_path)
        if loaded[key_path].shape != current.shape:
            raise ValueError(f"config.model.init_from: {path} has {name} of shape "
                             f"{loaded[key_path].shape}, the configured model needs "
                             f"{current.shape}")
        taken.append(name)
        return jax.device_put(loaded[key_path], sharding)

    new = jax.tree_util.tree_map_with_path(take, encoder, shardings)
    return new, len(taken), len(jax.tree.leaves(encoder))
