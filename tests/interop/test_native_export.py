"""Native resolution and transformers: our sizing rule is SigLIP 2's, and an exported encoder
gives, in transformers' MLCDVisionModel on each image resized as its preprocessor_config.json
says, the features our pipeline gives the same image at its native size (≤ 1e-4)."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from transformers.models.siglip2.image_processing_pil_siglip2 import (
    get_image_size_for_max_num_patches,
)

from mlcd_jax.data import transforms
from mlcd_jax.interop import weights
from mlcd_jax.interop.hf import __main__ as hf_cli, mapping as hf
from mlcd_jax.labels import embed
from mlcd_jax.models import vit

TOL = 1e-4


def test_budget_size_is_siglip2s_rule():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 4000, 2))
        p, n = int(rng.choice([4, 8, 14, 16, 32])), int(rng.integers(1, 2000))
        assert transforms.budget_size(h, w, p, n) == get_image_size_for_max_num_patches(h, w, p, n)


class Images:
    """A source of the given uint8 images (their class: their index)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i}

    def name(self, i):
        return f"images[{i}]"


def mixed_images(seed=0):
    """Smooth random images of very different aspect ratios (smooth: bicubic resizing of noise
    would amplify any 1-px difference)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in [(20, 20), (12, 70), (90, 15), (33, 47), (8, 8), (64, 30)]:
        small = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3)).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR)))
    return out


def transformers_features(model, path, images, native):
    """pooler_output of MLCDVisionModel on each image as the exported config says: resize to the
    SigLIP 2 size (bicubic), then the CLIP processor's rescale and normalisation."""
    config = json.loads((path / hf.PREPROCESSOR_FILE).read_text())
    rule = config[hf.NATIVE_KEY]
    processor = transformers.CLIPImageProcessor.from_pretrained(path)
    out = []
    for image in images:
        h, w = get_image_size_for_max_num_patches(*image.shape[:2], rule["patch_size"],
                                                  rule["max_num_patches"])
        resized = Image.fromarray(image).resize((w, h), Image.BICUBIC)
        pixels = processor(images=resized, return_tensors="pt")["pixel_values"]
        assert tuple(pixels.shape[2:]) == (h, w) == native.size(*image.shape[:2])
        with torch.no_grad():
            out.append(model(pixel_values=pixels).pooler_output[0].numpy())
    return np.stack(out)


def test_exported_native_encoder_gives_our_features_in_transformers(tmp_path):
    cfg = vit.vit_config("micro", patch=4)
    ours = vit.ViT(cfg, rngs=nnx.Rngs(0))
    native = transforms.Native(patch=4, max_tokens=40)
    hf.save_vision_model(ours, tmp_path, native)
    assert hf.read_native(tmp_path) == native
    model = transformers.MLCDVisionModel.from_pretrained(tmp_path).eval()
    images = mixed_images()
    source = Images(images)
    got = np.concatenate([x for x, _ in embed.embeddings(ours, source, image_size=16,
                                                           batch_size=4, native=native)])
    want = transformers_features(model, tmp_path, images, native)
    print("max |ours − transformers|:", np.abs(got - want).max())
    assert np.abs(got - want).max() <= TOL
    # square images stay as they were: CLIP's resize and crop in the exported config
    hf.save_vision_model(ours, tmp_path / "square")
    square = json.loads((tmp_path / "square" / hf.PREPROCESSOR_FILE).read_text())
    assert square["crop_size"] == {"height": 16, "width": 16} and hf.NATIVE_KEY not in square
    assert hf.read_native(tmp_path / "square") is None


def test_squashed_export_resizes_the_whole_image_in_transformers(tmp_path):
    """resolution squash: CLIP's processor resizes each whole image to the square (no crop), and
    MLCDVisionModel on that gives our features through the patch path."""
    ours = vit.ViT(vit.vit_config("micro"), rngs=nnx.Rngs(1))
    squash = transforms.Native(patch=4, max_tokens=16, keep_aspect=False)
    hf.save_vision_model(ours, tmp_path, squash)
    assert hf.read_native(tmp_path) == squash
    model = transformers.MLCDVisionModel.from_pretrained(tmp_path).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    images = mixed_images(1)
    got = np.concatenate([x for x, _ in embed.embeddings(ours, Images(images), image_size=16,
                                                           batch_size=4, native=squash)])
    for image, mine in zip(images, got):
        pixels = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        assert tuple(pixels.shape[2:]) == (16, 16)
        with torch.no_grad():
            theirs = model(pixel_values=pixels).pooler_output[0].numpy()
        assert np.abs(theirs - mine).max() <= TOL


def test_model_dirs_and_imports_keep_the_sizing(tmp_path, capsys):
    ours = vit.ViT(vit.vit_config("micro"), rngs=nnx.Rngs(0))
    native = transforms.Native(patch=4, max_tokens=30, min_tokens=8)
    weights.save_model_dir(ours, tmp_path / "ours", native)
    assert weights.native_sizing(tmp_path / "ours") == native
    assert hf_cli.main(["export", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert "native resolution ≤ 30 patches" in capsys.readouterr().out
    assert hf.read_native(tmp_path / "hf") == native
    assert hf_cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert weights.native_sizing(tmp_path / "back") == native
    # a command's choice over the model's own
    assert weights.sizing(tmp_path / "ours", ours) == native
    assert weights.sizing(tmp_path / "ours", ours, "square") is None
    assert weights.sizing(tmp_path / "ours", ours, "native", 50) == transforms.Native(4, 50, 8)
    with pytest.raises(ValueError, match="--max_tokens: token budgets are for --resolution"):
        weights.sizing(tmp_path / "ours", ours, "square", 50)
    assert weights.sizing(tmp_path / "ours", ours, "native", 6) == transforms.Native(4, 6)
    with pytest.raises(ValueError, match="--min_tokens: .* got min_tokens 9, max_tokens 6"):
        weights.sizing(tmp_path / "ours", ours, "native", 6, 9)
    assert weights.sizing(tmp_path / "ours", ours, "squash", image_size=24) == transforms.Native(
        4, 36, keep_aspect=False)
