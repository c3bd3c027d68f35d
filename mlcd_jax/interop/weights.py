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

from mlcd_jax.data import transforms
from mlcd_jax.interop.hf import mapping as hf
from mlcd_jax.models import vit
from mlcd_jax.runtime.errors import MissingFile, UserError


def _this_host():
    """This process's first device: where a loaded model lives (in a multi-host job, each process
    holds its own copy)."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


NATIVE_FILE = "native.json"  # our model dir's native sizing (absent: square images)


def save_model_dir(model: vit.ViT, path, native: transforms.Native | None = None) -> pathlib.Path:
    """Our own format: vit_config.json + an orbax checkpoint of the parameters (+ native.json:
    the native sizing its images had)."""
    import orbax.checkpoint as ocp
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vit_config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    (path / NATIVE_FILE).unlink(missing_ok=True)
    if native is not None:
        (path / NATIVE_FILE).write_text(json.dumps(dataclasses.asdict(native), indent=2))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", nnx.to_pure_dict(nnx.state(model)), force=True)
    return path


def _read_model_dir_config(path: pathlib.Path, **overrides) -> vit.ViTConfig:
    config_file = path / "vit_config.json"
    if not config_file.is_file():
        raise MissingFile(f"{config_file} not found: expected a model directory written by "
                          "`python -m mlcd_jax.interop.hf import` (vit_config.json + "
                          "params/)")
    fields = json.loads(config_file.read_text())
    if isinstance(fields.get("image_size"), list):
        fields["image_size"] = tuple(fields["image_size"])
    try:
        return vit.ViTConfig(**(fields | overrides))
    except (TypeError, ValueError) as e:  # TypeError: a field ViTConfig does not have
        raise UserError(f"{config_file}: {e}") from None


def load_model_dir(path, **overrides) -> vit.ViT:
    import orbax.checkpoint as ocp
    path = pathlib.Path(path).absolute()
    cfg = _read_model_dir_config(path, **overrides)
    shapes = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(vit.ViT(cfg, rngs=nnx.Rngs(0)))))
    here = _this_host()  # each process of a job reads the whole model for itself
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), shapes)
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(path / "params", target)
    return vit.with_params(cfg, params)


def _workdir_config(workdir):
    """A training workdir's resolved config, as this version of the code reads it."""
    import ml_collections

    from mlcd_jax.config import schema
    config_file = pathlib.Path(workdir) / "config.json"
    if not config_file.is_file():
        raise MissingFile(f"{config_file} not found: not a training workdir")
    return schema.upgrade(ml_collections.ConfigDict(json.loads(config_file.read_text())))


def _restore_workdir(workdir, step: int | None = None):
    """(config, params, step) of a training workdir's checkpoint `step` (default: the latest),
    checksums verified, restored onto this process's first device."""
    from mlcd_jax.runtime import checkpoint
    workdir = pathlib.Path(workdir).absolute()
    c = _workdir_config(workdir)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    try:
        steps = ckpt.steps()
        step = (steps[-1] if steps else None) if step is None else step
        if step is None or step not in steps:
            raise MissingFile(f"no checkpoint {'' if step is None else step} in "
                              f"{workdir / 'checkpoints'} (have {steps})")
        # The run may have used another device count: every array onto this process's first
        # device, shapes as stored.
        here = _this_host()
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                              ckpt.metadata(step))
        state, _ = ckpt.restore(target, step)
    finally:
        ckpt.close()
    return c, state["params"], step


def load_from_workdir(workdir, step: int | None = None) -> tuple[vit.ViT, int]:
    """(encoder, step) of a training workdir: its resolved config.json and checkpoint `step`
    (default: the latest), checksums verified, restored onto this process's first device."""
    c, params, step = _restore_workdir(workdir, step)
    return vit.with_params(vit.from_config(c), params["encoder"]), step


# RICE's Region Transformer layers, beside an exported encoder (transformers ignores them).
REGION_FILE, REGION_CONFIG = hf.REGION_FILE, "region_layer.json"


def _named(params: dict) -> dict:
    """A pure params dict as {"blocks.0.q_proj.kernel": array, ...}."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def save_region_layers(layers, path) -> pathlib.Path:
    """`layers` (models/region.RegionLayers) as REGION_FILE (flat names, e.g.
    blocks.0.q_proj.kernel) and REGION_CONFIG (the layer count and the ViT config it runs in)."""
    import numpy as np
    from safetensors.numpy import save_file
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    named = _named(nnx.to_pure_dict(nnx.state(layers)))
    save_file({k: np.asarray(v) for k, v in named.items()}, str(path / REGION_FILE))
    (path / REGION_CONFIG).write_text(json.dumps(
        {"layers": len(layers.blocks), "vit": dataclasses.asdict(layers.cfg)}, indent=2))
    return path / REGION_FILE


def load_region_layers(path, step: int | None = None):
    """The Region Transformer layers that go with the encoder at `path` (a training workdir
    whose run had region heads, or a dir with REGION_CONFIG beside the encoder), or None."""
    from mlcd_jax.models import region
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        c, params, _ = _restore_workdir(path, step)
        if "region" not in params:
            return None
        layers = lambda cfg, rngs: region.RegionLayers(cfg, c.model.region_layers, rngs=rngs)
        return vit.with_params(vit.from_config(c), params["region"], cls=layers)
    if not (path / REGION_CONFIG).is_file():
        return None
    from safetensors.numpy import load_file
    described = json.loads((path / REGION_CONFIG).read_text())
    cfg = vit.ViTConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in described["vit"].items()})
    layers = lambda cfg, rngs: region.RegionLayers(cfg, described["layers"], rngs=rngs)
    want = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: layers(cfg, nnx.Rngs(0)))))
    stored = load_file(str(path / REGION_FILE))
    missing = sorted(set(_named(want)) - set(stored))
    if missing:
        raise UserError(f"{path / REGION_FILE} lacks {', '.join(missing[:3])}: export it again")
    leaves, treedef = jax.tree_util.tree_flatten(want)
    params = jax.tree_util.tree_unflatten(treedef, [stored[k] for k in _named(want)])
    return vit.with_params(cfg, params, cls=layers)


def load_encoder(path, step: int | None = None) -> tuple[vit.ViT, str]:
    """(encoder, what it is) from a training workdir (step `step`, default the latest), our model
    dir, or a transformers checkpoint dir."""
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        model, step = load_from_workdir(path, step)
        return model, f"{path} (step {step})"
    if step is not None:
        raise UserError(f"--step {step}: {path} is not a training workdir (no checkpoints/)")
    if (path / "vit_config.json").is_file():
        return load_model_dir(path), str(path)
    if (path / "config.json").is_file():
        return hf.load_vision_model(path), str(path)
    raise MissingFile(f"{path}: neither a training workdir (config.json + checkpoints/), our "
                      "model dir (vit_config.json) nor a transformers checkpoint "
                      "(config.json + *.safetensors)")


def native_sizing(path) -> transforms.Native | None:
    """The native sizing the encoder at `path` was trained (or exported) with: a training
    workdir's data.resolution, our model dir's native.json, a transformers dir's preprocessor
    config; None: square images."""
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        c = _workdir_config(path)
        return transforms.native_sizing(c.data, vit.from_config(c).patch)
    if (path / "vit_config.json").is_file():
        if not (path / NATIVE_FILE).is_file():
            return None
        try:
            return transforms.Native(**json.loads((path / NATIVE_FILE).read_text()))
        except (TypeError, ValueError) as e:
            raise UserError(f"{path / NATIVE_FILE}: not a native sizing ({e})") from None
    return hf.read_native(path)


def image_side(path, model: vit.ViT, image_size: int = 0,
               native: transforms.Native | None = None, flag: str = "--") -> int:
    """The side of the images a command feeds `model` (loaded from `path`): `image_size`, or 0
    for the model's own. Square crops of a model with a learned position table (CLIP-style) are
    its own size only (`native` sizing resizes the table per image, any size goes)."""
    own = model.cfg.image_hw
    if not image_size:
        return own[0]
    if native is None and model.cfg.pos == "learned" and (image_size, image_size) != own:
        raise UserError(f"{flag}image_size {image_size}: {path} takes {own[0]}×{own[1]} images "
                        f"(its position embedding is a learned {own[0] // model.cfg.patch}×"
                        f"{own[1] // model.cfg.patch} table); leave {flag}image_size out to use "
                        "its size")
    return image_size


def sizing(path, model: vit.ViT, resolution: str = "", max_tokens: int = 0,
           min_tokens: int = 0, image_size: int = 0,
           flag: str = "--") -> transforms.Native | None:
    """How a command feeds `model` (loaded from `path`) images: `resolution` "" its own
    (`native_sizing`), "square", or "native" with a budget of `max_tokens` patches (0: its own
    budget, else the square size's, (image_size or the model's / patch)²) and `min_tokens`.
    `flag` names the options in errors ("--" or "config.image.")."""
    if resolution not in ("", "square", "native", "squash"):
        raise UserError(f"{flag}resolution: must be square, native or squash (or empty: the "
                        f"model's own), got {resolution!r}")
    own = native_sizing(path)
    if resolution == "squash" or (not resolution and own and not own.keep_aspect):
        if max_tokens or min_tokens:
            raise UserError(f"{flag}max_tokens: token budgets are for {flag}resolution native")
        side = image_size or (own.size(1, 1)[0] if own else model.cfg.image_hw[0])
        return transforms.Native(model.cfg.patch, (side // model.cfg.patch) ** 2,
                                 keep_aspect=False)
    if resolution == "square" or (not resolution and own is None):
        if max_tokens or min_tokens:
            raise UserError(f"{flag}max_tokens: token budgets are for {flag}resolution native"
                            + ("" if resolution else f" ({path} was trained on square images)"))
        return None
    patch = model.cfg.patch
    side = image_size or model.cfg.image_hw[0]
    own = own if own and own.keep_aspect else None  # a squashed model asked for native sizes
    budget = max_tokens or (own.max_tokens if own else (side // patch) ** 2)
    least = min_tokens or (own.min_tokens if own and own.min_tokens <= budget else 0)
    try:
        return transforms.Native(patch, budget, least)
    except UserError as e:
        raise UserError(f"{flag}min_tokens: {e}") from None


def architecture(path) -> vit.ViTConfig:
    """The ViTConfig of the encoder at `path` (any form `load_encoder` takes), weights unread."""
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        return vit.from_config(_workdir_config(path))
    if (path / "vit_config.json").is_file():
        return _read_model_dir_config(path)
    if (path / "config.json").is_file():
        return hf.read_vision_config(path)
    raise MissingFile(f"config.model.init_from: {path}: neither a training workdir "
                      "(config.json + checkpoints/), our model dir (vit_config.json) nor a "
                      "transformers checkpoint (config.json + *.safetensors)")


# Config fields the checkpoint decides (ViTConfig's name for each), beside the shape.
_DECIDED = {"model.pos": "pos", "model.act": "act", "model.rope_theta": "rope_theta",
            "model.ln_eps": "ln_eps"}


def adopt_architecture(c, explicit=frozenset()) -> str:
    """With `config.model.init_from`, its encoder's architecture replaces the config's: the
    shape (model.size or width/depth/heads/mlp_dim/patch), pos, act, rope_theta, ln_eps, the
    projection width where it has one, and for learned positions the image size they were made
    for. A field given on the command line (`explicit`: names like "model.size") that contradicts
    the checkpoint is one line naming both values. Returns what was taken, for the start line."""
    path, m = c.model.init_from, c.model
    arch = architecture(path)
    shape = {f: getattr(arch, f) for f in vit.SHAPE_FIELDS}
    said = " ".join(f"{k} {v}" for k, v in shape.items())

    def contradicts(field, mine, theirs):
        return UserError(f"config.{field}: {mine} on the command line contradicts "
                         f"config.model.init_from {path}, which has {theirs}; drop "
                         f"--config.{field} to take the checkpoint's")

    if "model.size" in explicit and m.size:
        named = {f: vit.SIZES.get(m.size, {}).get(f) for f in shape}
        if named != shape:
            mine = " ".join(f"{k} {v}" for k, v in named.items())
            raise contradicts("model.size", f"{m.size} ({mine})", said)
    for f, v in shape.items():
        if f"model.{f}" in explicit and m[f] and m[f] != v:
            raise contradicts(f"model.{f}", m[f], v)
    for field, name in _DECIDED.items():
        mine = m[field.split(".")[1]]
        if field in explicit and mine not in ("", getattr(arch, name)):
            raise contradicts(field, mine, getattr(arch, name))
    notes = []
    named = next((n for n, spec in vit.SIZES.items()
                  if all(spec[f] == v for f, v in shape.items())), "")
    if m.size != named or any(m[f] not in (0, v) for f, v in shape.items()):
        notes.append(f"replacing the config's model.size {m.size!r}")
    m.size = named
    for f, v in shape.items():
        m[f] = 0 if named else v
    m.pos, m.act, m.rope_theta, m.ln_eps = arch.pos, arch.act, float(arch.rope_theta), \
        float(arch.ln_eps)
    if arch.pos == "learned":  # its position embedding is for one image size
        side = arch.image_hw[0] if arch.image_hw[0] == arch.image_hw[1] else list(arch.image_hw)
        for field in ("model.image_size", "data.image_size"):
            mine = c.model.image_size if field == "model.image_size" else c.data.image_size
            if field in explicit and mine and mine != side:
                raise contradicts(field, mine, f"learned positions for {side} px")
        m.image_size, c.data.image_size = 0, side
    if arch.embed_dim and "model.embed_dim" not in explicit:
        m.embed_dim = arch.embed_dim
    return (f"{arch.pos} ViT {named or 'of'} {said}, {arch.act}"
            + (f", {arch.embed_dim}-d projection" if arch.embed_dim else ", no projection")
            + (f" ({'; '.join(notes)})" if notes else ""))


def init_from(path, encoder, shardings, step: int | None = None) -> tuple[dict, str]:
    """`encoder` (a pure dict of sharded arrays) with every parameter the model at `path` has
    (any form `load_encoder` takes, e.g. a transformers MLCD model to continue pretraining);
    the others stay as initialized: a projection the checkpoint lacks, or one of another width
    (`config.model.embed_dim` given). Returns (encoder, what was loaded and what not)."""
    model, _ = load_encoder(path, step)
    loaded = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0])
    taken, fresh = [], []

    def take(key_path, current, sharding):
        name = jax.tree_util.keystr(key_path)
        if key_path not in loaded:
            fresh.append(f"{name} (not in the checkpoint)")
            return current
        if loaded[key_path].shape != current.shape:
            if getattr(key_path[0], "key", None) == "projection":
                fresh.append(f"{name} (the checkpoint's is {loaded[key_path].shape})")
                return current
            raise UserError(f"config.model.init_from: {path} has {name} of shape "
                            f"{loaded[key_path].shape}, the configured model needs "
                            f"{current.shape}")
        taken.append(name)
        return jax.device_put(loaded[key_path], sharding)

    new = jax.tree_util.tree_map_with_path(take, encoder, shardings)
    said = f"{len(taken)} of {len(jax.tree.leaves(encoder))} parameter arrays from {path}"
    return new, said + (f"; newly initialized: {', '.join(fresh)}" if fresh else "")
