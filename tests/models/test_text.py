"""The text tower against transformers' CLIPTextModel / CLIPTextModelWithProjection: our outputs
equal theirs for the same weights, and what we write loads in transformers with equal outputs."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mlcd_jax.interop.hf import mapping as hf
from mlcd_jax.models import text

TOL = 1e-4  # largest |ours − transformers| allowed, float32

CONFIGS = {
    # name: (transformers class, config kwargs)
    "plain": (transformers.CLIPTextModel,
              dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=12, eos_token_id=96)),
    "projection_gelu": (transformers.CLIPTextModelWithProjection,
                        dict(vocab_size=80, hidden_size=48, intermediate_size=96,
                             num_hidden_layers=3, num_attention_heads=3,
                             max_position_embeddings=10, hidden_act="gelu", projection_dim=24,
                             eos_token_id=79)),
    "legacy_eos": (transformers.CLIPTextModel,  # eos_token_id 2: pooled at the largest id
                   dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=9, eos_token_id=2)),
}


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tokens(config, batch=3, seed=0):
    """Texts of several lengths: ids, then the end-of-text id, then padding (0)."""
    rng = np.random.default_rng(seed)
    t, eos = config.max_position_embeddings, config.vocab_size - 1
    ids = np.zeros((batch, t), np.int64)
    for row, length in enumerate(rng.integers(1, t, batch)):
        ids[row, :length] = rng.integers(3, eos - 1, length)
        ids[row, length] = eos
    return ids


def theirs(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids))
    return {k: getattr(out, k).numpy() for k in ("last_hidden_state", "pooler_output",
                                                   "text_embeds")
            if getattr(out, k, None) is not None}


def ours(model, ids):
    out = model(jnp.asarray(ids))
    return {"last_hidden_state": np.asarray(out.last_hidden_state),
            "pooler_output": np.asarray(out.pooler_output),
            "text_embeds": np.asarray(out.embedding)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    cls, kwargs = CONFIGS[request.param]
    model = randomize(cls(transformers.CLIPTextConfig(**kwargs)), seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def assert_equal_outputs(a, b):
    for name, want in b.items():
        diff = float(np.abs(a[name] - want).max())
        assert diff <= TOL * max(1.0, float(np.abs(want).max())), (name, diff)


def test_load_matches_transformers(checkpoint):
    model, path = checkpoint
    tower = hf.load_text_model(path)
    assert (tower.cfg.embed_dim is not None) == hasattr(model, "text_projection")
    ids = tokens(model.config)
    assert_equal_outputs(ours(tower, ids), theirs(model, ids))


def test_save_loads_in_transformers_with_equal_outputs(checkpoint, tmp_path):
    model, path = checkpoint
    tower = hf.load_text_model(path)
    out = hf.save_text_model(tower, tmp_path / "out")
    cls = type(model)
    back, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = tokens(model.config, seed=1)
    assert_equal_outputs(ours(tower, ids), theirs(back.eval(), ids))


def test_scan_remat_and_padded_attention_are_the_same_function(checkpoint):
    _, path = checkpoint
    base = hf.load_text_model(path)
    ids = tokens(transformers.CLIPTextConfig(vocab_size=base.cfg.vocab_size,
                                             max_position_embeddings=base.cfg.context_length),
                 seed=2)
    want = ours(base, ids)
    for overrides in ({"scan": True, "remat": True}, {"attention_pad": 8}):
        assert_equal_outputs(ours(hf.load_text_model(path, **overrides), ids), want)


def test_sizes_and_bad_configs():
    assert text.text_config("B").width == 512 and text.text_config("L").heads == 12
    with pytest.raises(ValueError, match="unknown text tower size"):
        text.text_config("XL")
    with pytest.raises(ValueError, match="not divisible"):
        text.TextConfig(width=30, depth=1, heads=4, mlp_dim=8)
    tower = text.TextTransformer(text.text_config("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="17 tokens per text"):
        tower(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="not a CLIP text model"):
        hf.text_config_from_hf({"model_type": "bert"})
