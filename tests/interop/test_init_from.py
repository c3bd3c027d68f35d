"""Continuing pretraining from a released encoder (`config.model.init_from`): the architecture
comes from the checkpoint, a command-line field that contradicts it is one line, and the README's
way (train, resume, export, transformers loads it) works end to end, writing nothing where it was
not asked to."""

import json

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mlcd_jax.interop import weights
from mlcd_jax.interop.hf import mapping as hf
from mlcd_jax.models import vit

from helpers import commands

TINY = str(commands.REPO / "configs" / "test_tiny.py")


def tiny_config() -> ml_collections.ConfigDict:
    import importlib.util
    spec = importlib.util.spec_from_file_location("test_tiny", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def save_hf(path, cfg: vit.ViTConfig):
    return hf.save_vision_model(vit.ViT(cfg, rngs=nnx.Rngs(0)), path)


def test_the_checkpoint_sets_the_architecture(tmp_path):
    """An MLCD dir of no named size replaces the config's size, pos, act, rope_theta and ln_eps;
    without a projection the configured one stays (new)."""
    path = save_hf(tmp_path / "hf", vit.ViTConfig(width=48, depth=3, heads=4, mlp_dim=96, patch=4,
                                                  image_size=16, rope_theta=500.0, ln_eps=1e-6))
    c = tiny_config()
    c.model.init_from = str(path)
    said = weights.adopt_architecture(c)
    assert "replacing the config's model.size 'micro'" in said and "no projection" in said
    cfg = vit.from_config(c)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch) == (48, 3, 4, 96, 4)
    assert (cfg.pos, cfg.act, cfg.rope_theta, cfg.ln_eps, cfg.embed_dim) == (
        "rope", "gelu", 500.0, 1e-6, 32)  # embed_dim: the config's, for a new projection
    assert c.model.size == ""


def test_a_named_size_and_a_clip_projection_and_its_image_size(tmp_path):
    """A CLIP checkpoint of a named shape: the name, learned positions, quick-GELU, its projection
    width and the image size its position embedding was made for."""
    shape = vit.SIZES["tiny"]
    path = save_hf(tmp_path / "clip", vit.ViTConfig(**(shape | dict(image_size=24)), pos="learned",
                                                    act="quick_gelu", embed_dim=24))
    c = tiny_config()
    c.model.init_from = str(path)
    weights.adopt_architecture(c)
    cfg = vit.from_config(c)
    assert c.model.size == "tiny" and c.data.image_size == 24
    assert (cfg.pos, cfg.act, cfg.embed_dim, cfg.image_hw) == ("learned", "quick_gelu", 24,
                                                                (24, 24))
    c = tiny_config()
    c.model.init_from, c.model.embed_dim = str(path), 16
    weights.adopt_architecture(c, {"model.embed_dim"})  # asked for: a new projection of 16
    assert vit.from_config(c).embed_dim == 16


@pytest.mark.parametrize("field, value, mine, theirs", [
    ("model.size", "micro", "micro (width 32 depth 2 heads 2 mlp_dim 64 patch 4)",
     "width 48 depth 3 heads 4 mlp_dim 96 patch 4"),
    ("model.width", 64, "64", "48"),
    ("model.pos", "learned", "learned", "rope"),
    ("model.act", "quick_gelu", "quick_gelu", "gelu"),
])
def test_an_explicit_field_that_contradicts_the_checkpoint_is_one_line(tmp_path, field, value,
                                                                       mine, theirs):
    path = save_hf(tmp_path / "hf", vit.ViTConfig(width=48, depth=3, heads=4, mlp_dim=96, patch=4,
                                                  image_size=16))
    c = tiny_config()
    c.model.init_from = str(path)
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError) as e:
        weights.adopt_architecture(c, {field})
    assert str(e.value) == (f"config.{field}: {mine} on the command line contradicts "
                            f"config.model.init_from {path}, which has {theirs}; drop "
                            f"--config.{field} to take the checkpoint's")


def test_learned_positions_refuse_another_image_size_given(tmp_path):
    path = save_hf(tmp_path / "clip", vit.ViTConfig(**vit.SIZES["micro"], pos="learned"))
    c = tiny_config()
    c.model.init_from, c.data.image_size = str(path), 32
    with pytest.raises(ValueError, match=r"config.data.image_size: 32 on the command line "
                                         r"contradicts .* learned positions for 16 px"):
        weights.adopt_architecture(c, {"data.image_size"})


@pytest.mark.slow
def test_continue_from_a_released_mlcd_model_end_to_end(tmp_path):
    """A transformers MLCDVisionModel (made here) → train with init_from → resume → export →
    transformers loads it with our outputs; labels and evaluate on it; the current directory stays
    empty throughout."""
    import torch
    import transformers
    torch.manual_seed(0)
    released = tmp_path / "released"
    transformers.MLCDVisionModel(transformers.MLCDVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=16, patch_size=4)).save_pretrained(released)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    run = tmp_path / "run"
    args = commands.train_args(run, f"--config.model.init_from={released}",
                               "--config.total_steps=20", "--config.checkpoint_every=5",
                               "--config.keep_checkpoints=10", "--config.optim.lr=1e-4",
                               config=TINY)
    first = commands.run("mlcd_jax.train", *args, cwd=elsewhere)
    assert (f"encoder: rope ViT of width 48 depth 3 heads 4 mlp_dim 96 patch 4, gelu, no "
            f"projection (replacing the config's model.size 'micro'): 23 of 24 parameter arrays "
            f"from {released}; newly initialized: ['projection']['kernel'] (not in the "
            "checkpoint)") in first.stdout
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["width"], saved["depth"], saved["size"]) == (48, 3, "")

    # Step 5 is the released weights after 5 small AdamW steps (lr ≤ 1e-4 each).
    ours = nnx.to_pure_dict(nnx.state(hf.load_vision_model(released)))

    def encoder(step):
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(run / "checkpoints" / str(step) / "state")["params"]["encoder"]

    at5 = encoder(5)
    for name in ("class_embedding", "class_pos_emb"):
        np.testing.assert_allclose(at5[name], ours[name], atol=1e-3)
    np.testing.assert_allclose(at5["blocks"]["fc1"]["kernel"], ours["blocks"]["fc1"]["kernel"],
                               atol=1e-3)

    # Resume: with the last two checkpoints gone, the rerun starts at step 10 from its own
    # checkpoint (not the released weights) and ends where the uninterrupted run ended.
    end = encoder(20)
    for step in (15, 20):
        __import__("shutil").rmtree(run / "checkpoints" / str(step))
    again = commands.run("mlcd_jax.train", *args, cwd=elsewhere)
    assert "resuming at step 10" in again.stdout
    assert "resuming, its weights not loaded again" in again.stdout
    for a, b in zip(__import__("jax").tree.leaves(encoder(20)),
                    __import__("jax").tree.leaves(end)):
        np.testing.assert_array_equal(a, b)

    # An explicit size that contradicts the checkpoint (here: the run itself) is one line.
    wrong = commands.run("mlcd_jax.train", *commands.train_args(
        tmp_path / "run2", f"--config.model.init_from={run}", "--config.model.size=micro",
        config=TINY), cwd=elsewhere, expect=2)
    assert wrong.stderr.strip().splitlines() == [
        f"error: config.model.size: micro (width 32 depth 2 heads 2 mlp_dim 64 patch 4) on the "
        f"command line contradicts config.model.init_from {run}, which has width 48 depth 3 "
        "heads 4 mlp_dim 96 patch 4; drop --config.model.size to take the checkpoint's"]

    # Export; transformers loads it with no missing or unexpected keys and our outputs.
    out = tmp_path / "exported"
    commands.run("mlcd_jax.interop.hf", "export", run, out, cwd=elsewhere)
    reloaded, info = transformers.MLCDVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = reloaded.eval()(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    model, _ = weights.load_encoder(run)
    np.testing.assert_allclose(np.asarray(model(x).pooler_output), theirs.pooler_output.numpy(),
                               atol=1e-5)

    # Labels and evaluate on the exported model write only under the paths given.
    emb, lab = tmp_path / "emb", tmp_path / "labels"
    commands.run("mlcd_jax.labels", "embed", f"--model={out}", "--source=digits", f"--out={emb}",
                 "--image_size=16", cwd=elsewhere)
    commands.run("mlcd_jax.labels", "all", f"--embeddings={emb}", f"--out={lab}", "--num_centers=8",
                 "--num_labels=2", cwd=elsewhere)
    assert (lab / "labels.npy").is_file()
    shown = commands.run("mlcd_jax.evaluate", f"--model={out}", "--dataset=digits", "--no-pixels",
                         cwd=elsewhere, devices=1)
    assert "not written: --out FILE.json" in shown.stdout
    assert not (out / "eval.json").exists()
    assert not list(elsewhere.iterdir()), list(elsewhere.iterdir())
