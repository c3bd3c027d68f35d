"""Native resolution in the trainer and everywhere the encoder runs: the input pipeline's patches,
the train step (with RICE's region heads) equal to the square step on a full grid, the config's
one-line errors, and (slow) a folder of mixed aspect-ratio images trained, evaluated, embedded
and exported, with transformers reproducing the features at native size."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from mlcd_jax.data import pipeline, sources, transforms
from mlcd_jax.models import region
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import input as input_lib, step, validation

from helpers import commands


def tiny(arg=None, **fields):
    from mlcd_jax.config.presets import test_tiny as config
    c = config.get_config(arg)
    for path, value in fields.items():
        section, name = path.split(".")
        c[section][name] = value
    return c


@pytest.mark.parametrize("keep_aspect", [True, False], ids=["native", "squash"])
def test_eval_batches_are_each_image_at_its_native_size(keep_aspect):
    """Patches of digits_strips put back together are the strip resized by the rule (squash: the
    whole strip to 32 × 32); every row's real patches come first; the batch has the budget's
    shape whatever the strips."""
    source = sources.Subset(sources.DigitsStripsSource("test"), range(6))
    native = transforms.Native(patch=4, max_tokens=64, keep_aspect=keep_aspect)
    batch = next(iter(pipeline.dataset(source, batch_size=6, image_size=32, num_labels=1, seed=0,
                                       train=False, process_index=0, process_count=1,
                                       native=native)))
    assert batch["patches"].shape == (6, 64, 48) and batch["patches"].dtype == np.uint8
    assert batch["positions"].shape == (6, 64, 2) and batch["mask"].shape == (6, 64)
    for i in range(6):
        image = source[i]["image"]
        h, w = native.size(*image.shape[:2]) if keep_aspect else (32, 32)
        want = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
        n = (h // 4) * (w // 4)
        assert batch["mask"][i].tolist() == [True] * n + [False] * (64 - n)
        grid = np.zeros((h // 4, w // 4, 4, 4, 3), np.uint8)
        rows, cols = batch["positions"][i, :n].T
        grid[rows, cols] = batch["patches"][i, :n].reshape(n, 4, 4, 3)
        np.testing.assert_array_equal(grid.transpose(0, 2, 1, 3, 4).reshape(h, w, 3), want)


def test_training_crops_keep_boxes_on_their_patches():
    """A record with regions through the native training transform: each kept box, in pixels of
    the resized crop, covers the patches holding its content (a white square on black)."""
    image = np.zeros((40, 100, 3), np.uint8)
    image[10:30, 60:80] = 255
    record = {"image": image, "labels": np.zeros(1, np.int32), "index": 0,
              "regions": (np.array([[60, 10, 80, 30]], np.float32),
                          {"objects": np.array([[3]], np.int32)})}
    native = transforms.Native(patch=4, max_tokens=48)
    for seed in range(5):
        out = pipeline._augment(record, np.random.default_rng(seed), size=32, scale=(0.7, 1.0),
                                flip=True, train=True, regions_per_image=2, native=native)
        if out["region_labels/objects"][0, 0] < 0:  # cropped away
            continue
        inside = np.asarray(region.patch_mask_at(out["boxes"][None], out["positions"][None],
                                                 out["mask"][None], 4))[0, 0]
        bright = out["patches"].reshape(48, -1).mean(-1) > 64
        assert bright[out["mask"]].any() and (inside | ~bright).all()  # every bright patch in


def test_native_step_on_a_full_grid_is_the_square_step(devices):
    """configs/test_tiny.py:regions (the image head and RICE's region heads) on 2 devices: the
    same synthetic images (and boxes) as square pixels and as a full grid of patches padded to 20
    tokens give the same losses and metrics, every head's, step by step, and the metrics say the
    padding (4 of 20)."""
    results = {}
    for resolution in ("square", "native"):
        c = tiny("regions", **{"data.resolution": resolution,
                               "data.max_tokens": 20 if resolution == "native" else 0})
        model_cfg, head_cfg = validation.validate(c, 2)
        mesh = mesh_lib.make_mesh(c.mesh, devices[:2])
        built = step.build(c, mesh, 3, model_cfg, head_cfg)
        native = transforms.native_sizing(c.data, model_cfg.patch)
        inputs = input_lib.SyntheticInput(c, built.batch_sharding, native=native)
        state = jax.jit(built.init, out_shardings=built.shardings)(jax.random.key(c.seed))
        results[resolution] = []
        for _ in range(2):
            batch, _ = inputs.next()
            state, metrics = built.step_fn(state, batch)
            results[resolution].append(jax.device_get(metrics))
    for square, native in zip(results["square"], results["native"]):
        assert native.pop("padding") == pytest.approx(0.2)
        assert set(square) == set(native)
        for k in square:
            assert native[k] == pytest.approx(square[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("fields, message", [
    ({"data.resolution": "nafllex"}, "config.data.resolution: must be one of"),
    ({"data.max_tokens": 20}, "config.data.max_tokens: token budgets are for"),
    ({"data.resolution": "native", "data.max_tokens": 10},
     "config.data.max_tokens: synthetic images are data.image_size² squares, 16 patches"),
    ({"data.resolution": "native", "data.min_tokens": 17},
     "config.data.min_tokens: 17 is more than the 16 of max_tokens"),
    ({"data.resolution": "native", "data.max_tokens": -1}, "config.data.max_tokens: must be ≥ 0"),
    ({"data.resolution": "squash", "data.max_tokens": 16},
     "config.data.max_tokens: token budgets are for config.data.resolution=native; squash"),
])
def test_resolution_mistakes_are_one_line(fields, message):
    with pytest.raises(ValueError, match=message):
        validation.validate(tiny(**fields), 8)


def mixed_folder(root, seed=0):
    """Two classes (a bright bar across or down the image) at very different aspect ratios."""
    rng = np.random.default_rng(seed)
    for k in range(24):
        h, w = [(20, 60), (60, 20), (30, 30), (16, 80), (44, 28), (24, 36)][k % 6]
        image = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
        label = k % 2
        if label:
            image[:, w // 2 - 2:w // 2 + 2] = 255
        else:
            image[h // 2 - 2:h // 2 + 2] = 255
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"c{label}" / f"{k:02d}.png")


@pytest.mark.slow
def test_a_folder_of_mixed_aspect_ratios_trains_evaluates_embeds_and_exports(tmp_path):
    """The issue's "done when", at a test's size: the demo model trains with
    --config.data.resolution=native on a folder of mixed aspect-ratio images (padding in its
    metrics), evaluate and `labels embed` feed it native-size images by default, export writes
    the sizing rule, and transformers' MLCDVisionModel on an image resized by that rule gives our
    features."""
    import torch
    import transformers
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        get_image_size_for_max_num_patches,
    )

    from mlcd_jax.interop import weights
    from mlcd_jax.interop.hf import mapping as hf
    from mlcd_jax.labels import embed
    mixed_folder(tmp_path / "train")
    mixed_folder(tmp_path / "test", seed=1)
    run = tmp_path / "run"
    commands.train(run, "--config.data.source=folder", f"--config.data.path={tmp_path / 'train'}",
                   "--config.data.resolution=native", "--config.data.max_tokens=48",
                   "--config.total_steps=4", "--config.batch_size=16", "--config.log_every=2",
                   "--config.evals.every=0", "--config.data.num_labels=1",
                   "--config.head.loss=unicom", "--config.data.workers=1",
                   config="configs/demo.py")
    logged = commands.records(run)
    assert all(0 < r["padding"] < 0.5 for r in logged)
    result = commands.run("mlcd_jax.evaluate", "--model", run, "--dataset", "folder", "--path",
                          tmp_path / "train", "--test_path", tmp_path / "test", "--no-pixels")
    assert "native resolution ≤ 48 patches" in result.stdout
    assert json.loads((run / "eval.json").read_text())["resolution"]["max_num_patches"] == 48
    commands.run("mlcd_jax.labels", "embed", "--model", run, "--source", "folder", "--path",
                 tmp_path / "test", "--out", tmp_path / "emb")
    commands.run("mlcd_jax.interop.hf", "export", run, tmp_path / "hf")

    encoder, _ = weights.load_encoder(run)
    native = weights.native_sizing(run)
    assert native == transforms.Native(4, 48) == hf.read_native(tmp_path / "hf")
    test = sources.FolderSource(tmp_path / "test")
    ours = np.concatenate([x for x, _ in embed.embeddings(encoder, test, image_size=32,
                                                            native=native)])
    stored = np.load(tmp_path / "emb" / "emb_00000.npy").astype(np.float32)
    normed = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(stored, normed, atol=2e-3)  # float16 shards of the same
    model = transformers.MLCDVisionModel.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    projection = np.asarray(encoder.projection.kernel[...])
    for i in range(len(test)):
        image = Image.open(test.paths[i]).convert("RGB")
        h, w = get_image_size_for_max_num_patches(image.height, image.width, 4, 48)
        pixels = processor(images=image.resize((w, h), Image.BICUBIC),
                           return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = model(pixel_values=pixels).pooler_output[0].numpy()
        assert np.abs(pooled @ projection - ours[i]).max() <= 1e-4


def test_native_demos_labels_are_each_strips_digit_clusters(tmp_path):
    """The native demo's teacher (mlcd_jax/demos/native.py): each strip's labels are distinct
    clusters, at most one per digit, −1 after; a strip of one digit carries that digit's cluster,
    and the clusters are mostly pure in digits (the teacher sees the clean glyphs)."""
    from mlcd_jax.demos import native as demo_native
    train = sources.DigitsStripsSource("train")
    labels = np.load(demo_native.teacher_labels(tmp_path, train) / "labels.npy")
    assert labels.shape == (len(train), 6)
    for row, digits in zip(labels, train.digits):
        real = row[row >= 0]
        assert 1 <= len(real) <= len(digits) and len(set(real.tolist())) == len(real)
        assert (row[len(real):] == -1).all()
    single = [(row[0], digits[0]) for row, digits in zip(labels, train.digits) if len(digits) == 1]
    assert len(single) > 100
    majority = sum(np.bincount([d for c, d in single if c == center]).max()
                   for center in {c for c, _ in single})
    assert majority / len(single) > 0.8
