"""Weights in and out of transformers' ``MLCDVisionModel`` and ``CLIPVisionModel``, and of the
text tower's ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (no torch needed).

    python -m mlcd_jax.interop.hf export RUN OUT [--step N]   # a training workdir → transformers
    python -m mlcd_jax.interop.hf export MODEL_DIR OUT        # our model dir → transformers
    python -m mlcd_jax.interop.hf import HF_DIR MODEL_DIR     # transformers → our model dir

A transformers checkpoint directory holds ``config.json`` and ``*.safetensors``; it loads with
``MLCDVisionModel.from_pretrained(OUT)`` (RoPE encoders) or ``CLIPVisionModel[WithProjection]``
(CLIP-style), which needs ``pip install torch transformers``. Our model directory holds
``vit_config.json`` (the ``ViTConfig``) and ``params/`` (an orbax checkpoint of the parameters).
Every conversion is a transpose or a stack, so a round trip is bit-exact.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from mlcd_jax.data import transforms
from mlcd_jax.models import text as text_lib, vit
from mlcd_jax.runtime.errors import MissingFile, UserError

MODEL_TYPES = {"mlcd_vision_model": "rope", "mlcd": "rope",
               "clip_vision_model": "learned", "clip": "learned"}
PREFIX = "vision_model."
PROJECTION_FILE = "mlcd_jax_projection.safetensors"  # MLCDVisionModel has no projection of its own
REGION_FILE = "region_layer.safetensors"  # RICE's region layers, beside (not the encoder's)
IGNORED_SUFFIXES = ("position_ids",)                  # buffers some checkpoints carry


def _same(x):
    return x


def _linear(x):  # torch Linear (out, in) ↔ ours (in, out)
    return np.swapaxes(x, -1, -2)


def _conv_in(x):  # torch Conv2d (out, in, kh, kw) → ours (kh, kw, in, out)
    return np.transpose(x, (2, 3, 1, 0))


def _conv_out(x):
    return np.transpose(x, (3, 2, 0, 1))


# (our parameter path, transformers name, ours→theirs, theirs→ours)
_BLOCK = [
    (("layer_norm1", "scale"), "layer_norm1.weight", _same, _same),
    (("layer_norm1", "bias"), "layer_norm1.bias", _same, _same),
    *[((p, "kernel"), f"self_attn.{p}.weight", _linear, _linear)
      for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
    *[((p, "bias"), f"self_attn.{p}.bias", _same, _same)
      for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
    (("layer_norm2", "scale"), "layer_norm2.weight", _same, _same),
    (("layer_norm2", "bias"), "layer_norm2.bias", _same, _same),
    *[((p, "kernel"), f"mlp.{p}.weight", _linear, _linear) for p in ("fc1", "fc2")],
    *[((p, "bias"), f"mlp.{p}.bias", _same, _same) for p in ("fc1", "fc2")],
]


def _top_level(cfg: vit.ViTConfig):
    entries = [
        (("class_embedding",), "embeddings.class_embedding", _same, _same),
        (("patch_embedding", "kernel"), "embeddings.patch_embedding.weight", _conv_out, _conv_in),
        (("pre_layrnorm", "scale"), "pre_layrnorm.weight", _same, _same),
        (("pre_layrnorm", "bias"), "pre_layrnorm.bias", _same, _same),
        (("post_layernorm", "scale"), "post_layernorm.weight", _same, _same),
        (("post_layernorm", "bias"), "post_layernorm.bias", _same, _same),
    ]
    if cfg.pos == "learned":
        entries.append((("position_embedding",), "embeddings.position_embedding.weight",
                        _same, _same))
    else:
        entries.append((("class_pos_emb",), "class_pos_emb", _same, _same))
    return entries


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, *, projection_dim: int | None = None, **overrides) -> vit.ViTConfig:
    """ViTConfig for a transformers config.json (a vision config, or a CLIP config with one)."""
    model_type = hf.get("model_type")
    if model_type in ("clip", "mlcd") and "vision_config" in hf:
        hf = {"model_type": f"{model_type}_vision_model",
              "projection_dim": hf.get("projection_dim"), **hf["vision_config"]}
        model_type = hf["model_type"]
    if model_type not in MODEL_TYPES:
        raise UserError(f"config.json: model_type {model_type!r} is not supported; expected one "
                        f"of {sorted(MODEL_TYPES)} (transformers MLCDVisionModel or "
                        "CLIPVisionModel)")
    rope = hf.get("rope_parameters") or {}
    try:
        fields = dict(
            width=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
            mlp_dim=hf["intermediate_size"], patch=hf["patch_size"],
            image_size=hf.get("image_size", 224), pos=MODEL_TYPES[model_type],
            act=hf.get("hidden_act", "gelu" if MODEL_TYPES[model_type] == "rope" else "quick_gelu"),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            ln_eps=float(hf.get("layer_norm_eps", 1e-5)), channels=hf.get("num_channels", 3),
            embed_dim=projection_dim)
    except KeyError as e:
        raise UserError(f"config.json: missing field {e.args[0]!r} for model_type "
                        f"{model_type!r}") from None
    if isinstance(fields["image_size"], list):
        fields["image_size"] = tuple(fields["image_size"])
    return vit.ViTConfig(**(fields | overrides))


def config_to_hf(cfg: vit.ViTConfig) -> dict:
    common = dict(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                  num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                  patch_size=cfg.patch, num_channels=cfg.channels, hidden_act=cfg.act,
                  layer_norm_eps=cfg.ln_eps, torch_dtype="float32")
    if cfg.pos == "rope":
        h, w = cfg.image_hw
        return dict(model_type="mlcd_vision_model", architectures=["MLCDVisionModel"],
                    image_size=h if h == w else [h, w],
                    rope_parameters={"rope_type": "axial", "rope_theta": cfg.rope_theta}, **common)
    if cfg.image_hw[0] != cfg.image_hw[1]:
        raise UserError(f"CLIPVisionModel needs square images; this model has {cfg.image_hw}")
    arch = "CLIPVisionModelWithProjection" if cfg.embed_dim else "CLIPVisionModel"
    return dict(model_type="clip_vision_model", architectures=[arch], image_size=cfg.image_hw[0],
                projection_dim=cfg.embed_dim or 512, **common)


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------

def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    files = sorted(p for p in path.glob("*.safetensors") if p.name != REGION_FILE)
    if not files:
        raise MissingFile(f"{path}: no *.safetensors files (expected a transformers "
                          "checkpoint directory saved with safe_serialization)")
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="np") as f:
                tensors |= {k: f.get_tensor(k) for k in f.keys()}
        except TypeError:  # bfloat16 has no numpy dtype: read through jax (ml_dtypes)
            with safe_open(file, framework="flax") as f:
                tensors |= {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    return tensors


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def vision_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The vision tower's tensors, named without the ``vision_model.`` prefix (a full CLIPModel
    checkpoint also holds a text tower, which is dropped)."""
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()
            if not k.startswith(("text_model.", "text_projection", "logit_scale"))}


def _ours_from(tensors, model, top, projection: str, *, source: str, what: str) -> dict:
    """Our parameter tree (a pure dict) for `model` (its config's shapes) from transformers
    `tensors` (names without the tower's prefix): the `top` entries, every block of `_BLOCK`
    stacked, and the bias-free `projection` if the model has one. `what` the config describes."""
    cfg = model.cfg
    expected = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(model)))
    used, params = set(), {}

    def take(name, to_ours, want_shape):
        if name not in tensors:
            raise UserError(f"{source}: tensor {name!r} is missing; the config describes {what}")
        value = to_ours(tensors[name])
        if value.shape != tuple(want_shape):
            raise UserError(f"{source}: tensor {name!r} has shape {tensors[name].shape}, which "
                            f"maps to {value.shape} but the config needs {tuple(want_shape)}; "
                            "does config.json belong to these weights?")
        used.add(name)
        return value

    for path, name, _, to_ours in top:
        _set(params, path, take(name, to_ours, _get(expected, path).shape))
    for path, name, _, to_ours in _BLOCK:
        layer_shape = _get(expected["blocks"], path).shape[1:]
        _set(params, ("blocks", *path), np.stack([
            take(f"encoder.layers.{i}.{name}", to_ours, layer_shape) for i in range(cfg.depth)]))
    if cfg.embed_dim:
        _set(params, ("projection", "kernel"),
             take(projection, _linear, expected["projection"]["kernel"].shape))
    unexpected = sorted(k for k in tensors if k not in used and not k.endswith(IGNORED_SUFFIXES)
                        and k != projection)
    if unexpected:
        raise UserError(f"{source}: unexpected tensors {unexpected[:5]}"
                        f"{' …' if len(unexpected) > 5 else ''} for {what}")
    return params


def _theirs_from(model, top, prefix: str, projection: str) -> dict[str, np.ndarray]:
    """transformers tensors of `model` (names with `prefix`), the inverse of `_ours_from`."""
    cfg, params = model.cfg, nnx.to_pure_dict(nnx.state(model))
    out = {prefix + name: to_hf(np.asarray(_get(params, path))) for path, name, to_hf, _ in top}
    for path, name, to_hf, _ in _BLOCK:
        stacked = np.asarray(_get(params["blocks"], path))
        for i in range(cfg.depth):
            out[f"{prefix}encoder.layers.{i}.{name}"] = to_hf(stacked[i])
    if cfg.embed_dim:
        out[projection] = _linear(np.asarray(params["projection"]["kernel"]))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def params_from_hf(cfg: vit.ViTConfig, vision: dict[str, np.ndarray],
                   source: str = "checkpoint") -> dict:
    """Our parameter tree (a pure dict) from `vision_tensors` of a transformers checkpoint."""
    model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
    return _ours_from(vision, model, _top_level(cfg), "visual_projection.weight", source=source,
                      what=f"a {cfg.pos} ViT with {cfg.depth} blocks (an MLCDVisionModel / "
                      "CLIPVisionModel checkpoint)")


def params_to_hf(model: vit.ViT) -> dict[str, np.ndarray]:
    """transformers tensors (``vision_model.`` names, as the released checkpoints) of our model."""
    return _theirs_from(model, _top_level(model.cfg), PREFIX, "visual_projection.weight")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def load_vision_model(path, **overrides) -> vit.ViT:
    """Our ViT with the weights of a transformers MLCDVisionModel / CLIPVisionModel directory.

    ``overrides`` set ViTConfig fields that do not change the weights (dtype, scan, remat,
    attention).
    Call the model on NHWC float32 pixels: ``.last_hidden_state`` and ``.pooler_output`` equal
    transformers' outputs for the same (NCHW) pixels.
    """
    path = pathlib.Path(path)
    cfg = read_vision_config(path, **overrides)
    vision = vision_tensors(read_safetensors(path))
    return vit.with_params(cfg, params_from_hf(cfg, vision, source=str(path)))


def read_vision_config(path, **overrides) -> vit.ViTConfig:
    """The ViTConfig of a transformers vision checkpoint dir, from config.json and the shape of
    its projection (if it has one), without reading the weights."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFile(f"{config_file} not found: expected a transformers checkpoint "
                          "directory (config.json + *.safetensors)")
    files = sorted(p for p in path.glob("*.safetensors") if p.name != REGION_FILE)
    if not files:
        raise MissingFile(f"{path}: no *.safetensors files (expected a transformers "
                          "checkpoint directory saved with safe_serialization)")
    projection_dim = None
    for file in files:
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                if name.removeprefix(PREFIX) == "visual_projection.weight":
                    projection_dim = f.get_slice(name).get_shape()[0]
    try:
        return config_from_hf(json.loads(config_file.read_text()), projection_dim=projection_dim,
                              **overrides)
    except UserError as e:
        raise UserError(f"{config_file}: {str(e).removeprefix('config.json: ')}") from None


def save_vision_model(model: vit.ViT, path,
                      native: transforms.Native | None = None) -> pathlib.Path:
    """Write `model` as a transformers checkpoint directory that from_pretrained loads with no
    missing or unexpected keys (MLCDVisionModel, or CLIPVisionModel[WithProjection]), with a
    preprocessor_config.json that says how its images are sized (`preprocessor_config`)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(model)
    if model.cfg.pos == "rope" and model.cfg.embed_dim:  # kept beside, ignored by transformers
        save_file({"visual_projection.weight": tensors.pop("visual_projection.weight")},
                  str(path / PROJECTION_FILE), metadata={"format": "pt"})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    (path / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor_config(model.cfg, native),
                                                     indent=2))
    return path


# ----------------------------------------------------------------------------------------------
# Preprocessing: how images are sized for the model
# ----------------------------------------------------------------------------------------------

PREPROCESSOR_FILE = "preprocessor_config.json"
NATIVE_KEY = "mlcd_jax_native"  # our sizing rule, beside the fields transformers reads
SIZING_FUNCTION = ("transformers.models.siglip2.image_processing_pil_siglip2."
                   "get_image_size_for_max_num_patches")


def preprocessor_config(cfg: vit.ViTConfig, native: transforms.Native | None) -> dict:
    """A CLIPImageProcessor config for the model's images. Square: CLIP's (the shorter side
    resized to the model's size, bicubic, the centre cropped, CLIP's mean and std), which is our
    eval transform. Native: no resize or crop by the processor, only the rescale and
    normalisation; the image is first resized (bicubic) to the size NATIVE_KEY's rule gives —
    with min_num_patches 0, SIZING_FUNCTION(height, width, patch_size, max_num_patches), which
    `transforms.budget_size` computes with the same float operations (the rule in full:
    `transforms.Native.size`). Squash: the processor resizes the whole image to the square."""
    common = {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(transforms.CLIP_MEAN_VALUES),
              "image_std": list(transforms.CLIP_STD_VALUES), "resample": 3}  # PIL bicubic
    if native is None:
        side = cfg.image_hw[0]
        return common | {"do_resize": True, "size": {"shortest_edge": side},
                         "do_center_crop": True, "crop_size": {"height": side, "width": side}}
    if not native.keep_aspect:  # squashed: the whole image to the square, no crop
        side = native.size(1, 1)[0]
        return common | {"do_resize": True, "size": {"height": side, "width": side},
                         "do_center_crop": False, NATIVE_KEY: native.describe()}
    rule = native.describe() | {
        "resize_first_to": f"{SIZING_FUNCTION}(height, width, patch_size, max_num_patches)"
        if not native.min_tokens else
        "the image's own size rounded up to whole patches where it has min_num_patches … "
        f"max_num_patches patches, else {SIZING_FUNCTION} with max_num_patches (larger) or "
        "min_num_patches (smaller)", "resample": "bicubic"}
    return common | {"do_resize": False, "do_center_crop": False, NATIVE_KEY: rule}


def read_native(path) -> transforms.Native | None:
    """The native sizing a transformers dir's preprocessor config states (None: none, square)."""
    file = pathlib.Path(path) / PREPROCESSOR_FILE
    if not file.is_file():
        return None
    rule = json.loads(file.read_text()).get(NATIVE_KEY)
    if not rule:
        return None
    try:
        return transforms.Native(int(rule["patch_size"]), int(rule["max_num_patches"]),
                                 int(rule.get("min_num_patches", 0)),
                                 keep_aspect=rule.get("resolution", "native") != "squash")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{file}: {NATIVE_KEY} is not a native sizing rule ({e})") from None


# ----------------------------------------------------------------------------------------------
# The text tower
# ----------------------------------------------------------------------------------------------

TEXT_PREFIX = "text_model."
TEXT_TOP = [
    (("token_embedding",), "embeddings.token_embedding.weight", _same, _same),
    (("position_embedding",), "embeddings.position_embedding.weight", _same, _same),
    (("final_layer_norm", "scale"), "final_layer_norm.weight", _same, _same),
    (("final_layer_norm", "bias"), "final_layer_norm.bias", _same, _same),
]


def text_config_from_hf(hf: dict, *, projection_dim: int | None = None,
                        **overrides) -> text_lib.TextConfig:
    """TextConfig for a transformers CLIPTextConfig (or a CLIPConfig with a text_config)."""
    if hf.get("model_type") == "clip" and "text_config" in hf:
        hf = {"model_type": "clip_text_model", "projection_dim": hf.get("projection_dim"),
              **hf["text_config"]}
    if hf.get("model_type") != "clip_text_model":
        raise UserError(f"config.json: model_type {hf.get('model_type')!r} is not a CLIP text "
                        "model (expected clip_text_model: CLIPTextModel[WithProjection])")
    eos = hf.get("eos_token_id", 2)
    try:
        fields = dict(width=hf["hidden_size"], depth=hf["num_hidden_layers"],
                      heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                      vocab_size=hf["vocab_size"],
                      context_length=hf.get("max_position_embeddings", 77),
                      act=hf.get("hidden_act", "quick_gelu"),
                      ln_eps=float(hf.get("layer_norm_eps", 1e-5)), embed_dim=projection_dim,
                      eos_token_id=None if eos == 2 else eos)  # 2: CLIP's legacy argmax pooling
    except KeyError as e:
        raise UserError(f"config.json: missing field {e.args[0]!r} of a CLIP text model") from None
    return text_lib.TextConfig(**(fields | overrides))


def text_config_to_hf(cfg: text_lib.TextConfig) -> dict:
    arch = "CLIPTextModelWithProjection" if cfg.embed_dim else "CLIPTextModel"
    return dict(model_type="clip_text_model", architectures=[arch], vocab_size=cfg.vocab_size,
                hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                max_position_embeddings=cfg.context_length, hidden_act=cfg.act,
                layer_norm_eps=cfg.ln_eps, projection_dim=cfg.embed_dim or 512,
                eos_token_id=2 if cfg.eos_token_id is None else cfg.eos_token_id,
                torch_dtype="float32")


def load_text_model(path, **overrides) -> text_lib.TextTransformer:
    """Our text tower with the weights of a transformers CLIPTextModel[WithProjection] (or a full
    CLIPModel) directory; `overrides` set fields that do not change the weights (dtype, ...)."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFile(f"{config_file} not found: expected a transformers checkpoint "
                          "directory (config.json + *.safetensors)")
    tensors = read_safetensors(path)
    projection = tensors.get("text_projection.weight")
    cfg = text_config_from_hf(json.loads(config_file.read_text()),
                              projection_dim=None if projection is None else projection.shape[0],
                              **overrides)
    # CLIPTextModel saves without the text_model. prefix, the others with it; a full CLIPModel
    # also holds a vision tower, which is dropped.
    text = {k.removeprefix(TEXT_PREFIX): v for k, v in tensors.items()
            if not k.startswith((PREFIX, "visual_projection", "logit_scale"))}
    model = nnx.eval_shape(lambda: text_lib.TextTransformer(cfg, rngs=nnx.Rngs(0)))
    params = _ours_from(text, model, TEXT_TOP, "text_projection.weight", source=str(path),
                        what=f"a CLIP text model with {cfg.depth} blocks")
    return text_lib.with_params(cfg, params)


def save_text_model(model: text_lib.TextTransformer, path) -> pathlib.Path:
    """Write `model` as a transformers CLIPTextModel[WithProjection] directory that
    from_pretrained loads with no missing or unexpected keys."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_theirs_from(model, TEXT_TOP, TEXT_PREFIX, "text_projection.weight"),
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(text_config_to_hf(model.cfg), indent=2))
    return path
