"""Weights in and out of transformers: outputs equal transformers' own, round trips bit-exact."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from mlcd_jax.interop import weights
from mlcd_jax.interop.hf import mapping as hf
from mlcd_jax.models import vit

from helpers import commands

TOL = 1e-5  # largest |ours − transformers| allowed, float32

ARCHS = {
    # name: (transformers class, config, input sizes (H, W))
    "mlcd": (transformers.MLCDVisionModel,
             transformers.MLCDVisionConfig(hidden_size=48, intermediate_size=96,
                                           num_hidden_layers=3, num_attention_heads=3,
                                           image_size=32, patch_size=8),
             [(32, 32), (32, 48), (48, 24)]),
    "mlcd_theta": (transformers.MLCDVisionModel,
                   transformers.MLCDVisionConfig(hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2,
                                                 image_size=28, patch_size=7,
                                                 rope_parameters={"rope_type": "axial",
                                                                  "rope_theta": 500.0}),
                   [(28, 28), (14, 42)]),
    "clip": (transformers.CLIPVisionModel,
             transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96,
                                           num_hidden_layers=3, num_attention_heads=4,
                                           image_size=32, patch_size=8),
             [(32, 32)]),
    "clip_gelu": (transformers.CLIPVisionModel,
                  transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2,
                                                image_size=24, patch_size=6, hidden_act="gelu"),
                  [(24, 24)]),
    "clip_projection": (transformers.CLIPVisionModelWithProjection,
                        transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      image_size=16, patch_size=4,
                                                      projection_dim=24),
                        [(16, 16)]),
}


def randomize(model, seed):
    """Random values everywhere (transformers inits LayerNorms to 1/0 and biases to 0, which would
    hide a swapped or transposed tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    cls, config, sizes = ARCHS[request.param]
    model = randomize(cls(config), seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path, sizes


def hf_outputs(model, x):
    """transformers' outputs for NHWC `x`, by name (numpy)."""
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return {k: getattr(out, k).numpy()
            for k in ("last_hidden_state", "pooler_output", "image_embeds")
            if getattr(out, k, None) is not None}


OUR_NAME = {"last_hidden_state": "last_hidden_state", "pooler_output": "pooler_output",
            "image_embeds": "embedding"}


def max_diff(ours, model, x):
    out = ours(jnp.asarray(x))._asdict()
    return {k: float(np.abs(np.asarray(out[OUR_NAME[k]]) - v).max())
            for k, v in hf_outputs(model, x).items()}


def inputs(h, w, seed=0):
    return np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("attention_pad", [0, 64])
def test_import_matches_transformers(checkpoint, attention_pad):
    """Also through the GPU's attention path (tokens padded to 64 and masked), run by XLA here."""
    name, model, path, sizes = checkpoint
    ours = hf.load_vision_model(path, attention_pad=attention_pad)
    assert ours.cfg.pos == ("rope" if name.startswith("mlcd") else "learned")
    for h, w in sizes:
        diffs = max_diff(ours, model, inputs(h, w))
        print(name, (h, w), {k: f"{v:.2e}" for k, v in diffs.items()})
        assert all(d <= TOL for d in diffs.values()), diffs


def test_import_with_vision_model_prefix(checkpoint, tmp_path):
    """Released checkpoints name tensors vision_model.*; ours reads both spellings."""
    name, model, path, sizes = checkpoint
    tensors = hf.read_safetensors(path)
    prefixed = {k if k.startswith(("vision_model.", "visual_projection"))
                else "vision_model." + k: v
                for k, v in tensors.items()}
    save_file(prefixed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    diffs = max_diff(hf.load_vision_model(tmp_path), model, inputs(*sizes[0]))
    assert all(d <= TOL for d in diffs.values()), diffs


def test_export_loads_in_transformers_with_equal_outputs(checkpoint, tmp_path):
    name, model, path, sizes = checkpoint
    ours = hf.load_vision_model(path)
    hf.save_vision_model(ours, tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    for h, w in sizes:
        diffs = max_diff(ours, reloaded.eval(), inputs(h, w, seed=1))
        assert all(d <= TOL for d in diffs.values()), diffs


def test_round_trip_is_bit_exact(checkpoint, tmp_path):
    name, model, path, _ = checkpoint
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    ours = hf.load_vision_model(path)
    exported = hf.vision_tensors(hf.params_to_hf(ours))  # names without vision_model.
    # through our own model directory too (orbax)
    again = weights.load_model_dir(weights.save_model_dir(ours, tmp_path / "ours"))
    exported_again = hf.vision_tensors(hf.params_to_hf(again))
    for key, value in original.items():
        key = key.removeprefix("vision_model.")
        if key.endswith("position_ids"):
            continue
        for got in (exported[key], exported_again[key]):
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert got.tobytes() == value.tobytes(), f"{key} changed in the round trip"
    assert set(exported) == {k.removeprefix("vision_model.") for k in original
                             if not k.endswith("position_ids")}


def test_export_of_our_own_rope_model_with_projection(tmp_path):
    """Our MLCD with a projection: transformers loads the encoder; the projection rides beside."""
    model = vit.ViT(vit.vit_config("micro", embed_dim=8), rngs=__import__("flax").nnx.Rngs(3))
    hf.save_vision_model(model, tmp_path)
    reloaded, info = transformers.MLCDVisionModel.from_pretrained(tmp_path,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = inputs(16, 24)
    diffs = max_diff(model, reloaded.eval(), x)
    assert all(d <= TOL for d in diffs.values()), diffs
    back = hf.load_vision_model(tmp_path)
    np.testing.assert_array_equal(back(jnp.asarray(x)).embedding, model(jnp.asarray(x)).embedding)


def run_cli(*args):
    """The command, as a user types it (`python -m mlcd_jax.interop.hf`)."""
    return commands.run("mlcd_jax.interop.hf", *args, expect=None)


@pytest.mark.slow
def test_cli_import_then_export(tmp_path):
    _, config, _ = ARCHS["mlcd"]
    model = randomize(transformers.MLCDVisionModel(config), seed=0)
    model.save_pretrained(tmp_path / "hf")
    result = run_cli("import", str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    assert "rope ViT width 48 depth 3" in result.stdout
    result = run_cli("export", str(tmp_path / "ours"), str(tmp_path / "back"))
    assert result.returncode == 0, result.stderr
    reloaded = transformers.MLCDVisionModel.from_pretrained(tmp_path / "back").eval()
    x = inputs(32, 40)
    np.testing.assert_array_equal(hf_outputs(model, x)["last_hidden_state"],
                                  hf_outputs(reloaded, x)["last_hidden_state"])


@pytest.mark.slow
def test_cli_errors_are_clear(tmp_path):
    _, config, _ = ARCHS["clip"]
    model = randomize(transformers.CLIPVisionModel(config), seed=0)
    model.save_pretrained(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    good = json.loads(config_file.read_text())

    config_file.write_text(json.dumps(good | {"model_type": "siglip_vision_model"}))
    result = run_cli("import", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "model_type 'siglip_vision_model' is not supported" in result.stderr

    config_file.write_text(json.dumps(good | {"intermediate_size": 100}))
    result = run_cli("import", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "encoder.layers.0.mlp.fc1.weight" in result.stderr and "(96, 48)" in result.stderr

    config_file.write_text(json.dumps(good | {"num_hidden_layers": 2}))
    result = run_cli("import", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert result.returncode == 2 and "unexpected tensors" in result.stderr

    result = run_cli("import", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert result.returncode == 2 and "config.json not found" in result.stderr
    result = run_cli("export", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert result.returncode == 2 and "neither a training workdir" in result.stderr


@pytest.mark.slow
def test_export_a_training_run_to_transformers(tmp_path):
    """workdir → `export RUN OUT [--step N]` → MLCDVisionModel.from_pretrained: the outputs of the
    checkpoint's encoder, for each step asked for."""
    from mlcd_jax.interop import weights
    from mlcd_jax.runtime import checkpoint
    commands.train(tmp_path / "run", "--config.total_steps=4", "--config.checkpoint_every=2",
                   "--config.optim.lr=0.05")
    x = inputs(16, 16)
    outputs = {}
    for step, args in ((4, []), (2, ["--step", "2"])):
        out = tmp_path / f"hf{step}"
        result = run_cli("export", str(tmp_path / "run"), str(out), *args)
        assert result.returncode == 0, result.stderr
        assert "MLCDVisionModel.from_pretrained" in result.stdout
        reloaded, info = transformers.MLCDVisionModel.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ours, _ = weights.load_encoder(tmp_path / "run", step)
        diffs = max_diff(ours, reloaded.eval(), x)
        assert all(d <= TOL for d in diffs.values()), diffs
        outputs[step] = hf_outputs(reloaded.eval(), x)["pooler_output"]
    assert np.abs(outputs[4] - outputs[2]).max() > 1e-3  # two different steps were exported
    result = run_cli("export", str(tmp_path / "run"), str(tmp_path / "x"), "--step", "3")
    assert (result.returncode == 2 and "no checkpoint 3" in result.stderr
            and "[2, 4]" in result.stderr)
    assert checkpoint.Checkpointer(tmp_path / "run" / "checkpoints").steps() == [2, 4]


@pytest.mark.slow
def test_cli_help_keeps_its_lines_and_bad_model_dirs_are_one_line(tmp_path):
    result = run_cli("--help")
    assert "\n    python -m mlcd_jax.interop.hf export RUN OUT [--step N]" in result.stdout
    from mlcd_jax.interop import weights
    weights.save_model_dir(vit.ViT(vit.vit_config("micro"), rngs=__import__("flax").nnx.Rngs(0)),
                           tmp_path / "ours")
    config_file = tmp_path / "ours" / "vit_config.json"
    good = json.loads(config_file.read_text())
    for bad, message in (({"ln_eps": float("nan")}, "ln_eps must be a finite positive number"),
                         ({"width": 0}, "width must be a positive integer"),
                         ({"heads": -2}, "heads must be a positive integer"),
                         ({"wdth": 3}, "unexpected keyword argument 'wdth'")):
        config_file.write_text(json.dumps(good | bad))
        result = run_cli("export", str(tmp_path / "ours"), str(tmp_path / "out"))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert str(config_file) in result.stderr and message in result.stderr
