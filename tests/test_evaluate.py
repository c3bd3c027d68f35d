"""Evaluators: linear probe and kNN against known behaviour, features sharded == unsharded, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from mlcd_jax import mesh as mesh_lib
from mlcd_jax.data import sources
from mlcd_jax.evaluate import features, probes, run
from mlcd_jax.models import vit
from numerics import assert_same_math


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:1200]], y[order[:1200]], x[order[1200:]], y[order[1200:]]


def test_linear_probe_on_digits(digits):
    train_x, train_y, test_x, test_y = digits
    result = probes.linear_probe(train_x, train_y, test_x, test_y)
    assert result["accuracy"] >= 0.93  # logistic regression on clean digits: ~0.96
    assert 1e-6 <= result["C"] <= 1e6
    shuffled = probes.linear_probe(train_x, np.random.default_rng(1).permutation(train_y),
                                   test_x, test_y)
    assert shuffled["accuracy"] < 0.25  # labels unrelated to features: chance is 0.1


def test_knn_on_digits_and_vote_by_hand(digits):
    train_x, train_y, test_x, test_y = digits
    assert probes.knn(train_x, train_y, test_x, test_y)["accuracy"] >= 0.95
    # Two neighbours of class 0 at cos 0.6, one of class 1 at cos 0.99: weights exp(s / T) decide.
    train = np.array([[0.6, 0.8], [0.6, -0.8], [0.99, np.sqrt(1 - 0.99**2)]])
    query = np.array([[1.0, 0.0]])
    got = probes.knn(train, np.array([0, 0, 1]), query, np.array([1]), k=3, temperature=0.07)
    assert got["accuracy"] == 1.0  # 2·e^(0.6/0.07) < e^(0.99/0.07)
    got = probes.knn(train, np.array([0, 0, 1]), query, np.array([0]), k=3, temperature=10.0)
    assert got["accuracy"] == 1.0  # at a high temperature the two votes win


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_features_sharded_equal_unsharded(devices, n):
    model = vit.ViT(vit.vit_config("micro", embed_dim=8), rngs=nnx.Rngs(0))
    src = sources.Subset(sources.DigitsSource(), np.arange(100))
    one, y1 = features.extract(model, src, image_size=16, batch_size=32)
    many, y8 = features.extract(model, src, image_size=16, batch_size=32,
                                mesh=mesh_lib.make_mesh([("data", -1)], devices[:n]))
    assert_same_math(many, one)
    np.testing.assert_array_equal(y1, sources.DigitsSource().labels[:100])
    np.testing.assert_array_equal(y8, y1)


def test_cli_on_a_training_workdir(tmp_path):
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    train = subprocess.run(
        [sys.executable, "-m", "mlcd_jax.train", "--config=configs/test_tiny.py",
         f"--workdir={tmp_path}", "--config.data.source=digits", "--config.head.num_classes=10",
         "--config.data.num_labels=1", "--config.total_steps=4"],
        capture_output=True, text=True, env=env)
    assert train.returncode == 0, train.stderr[-2000:]
    one_device = {k: v for k, v in env.items() if k != "XLA_FLAGS"}  # trained on 8, read on 1
    result = subprocess.run([sys.executable, "-m", "mlcd_jax.evaluate", f"--workdir={tmp_path}",
                             "--dataset=digits"], capture_output=True, text=True, env=one_device)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= out["linear_probe"]["accuracy"] <= 1 and 0 <= out["knn"]["accuracy"] <= 1
    assert out["train"] + out["test"] == 1797 and "step 4" in out["model"]
    bad = subprocess.run([sys.executable, "-m", "mlcd_jax.evaluate", f"--workdir={tmp_path / 'x'}",
                          "--dataset=digits"], capture_output=True, text=True)
    assert bad.returncode == 2 and "neither a training workdir" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "mlcd_jax.evaluate", f"--checkpoint={tmp_path}",
                              "--step=3", "--dataset=digits"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no checkpoint 3" in missing.stderr and "[4]" in missing.stderr


def digit_folders(root, split):
    """Real digits written as PNG folders, one sub-folder per class (the train and the test
    images are different digits)."""
    from PIL import Image
    src = sources.DigitsSource()
    for i in range(0 if split == "train" else 1, len(src), 3):
        folder = root / str(src.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(src.images[i]).save(folder / f"{i}.png")
    return root


def test_folder_splits_never_test_on_the_train_images(tmp_path):
    train_dir, test_dir = digit_folders(tmp_path / "train", "train"), digit_folders(tmp_path / "test", "test")
    train, test = run.dataset_splits("folder", path=str(train_dir), test_path=str(test_dir))
    assert {train.name(i) for i in range(len(train))}.isdisjoint(test.name(i) for i in range(len(test)))
    assert train.class_index == test.class_index
    held_train, held_test = run.dataset_splits("folder", path=str(train_dir), test_fraction=0.25)
    names = lambda s: {s.name(i) for i in range(len(s))}
    assert names(held_train).isdisjoint(names(held_test))
    assert len(held_test) == round(len(train) * 0.25)
    with pytest.raises(ValueError, match="--test_split: folder has no named splits .* give the test "
                                         "images as --test_path"):
        run.dataset_splits("folder", path=str(train_dir), test_split="test")
    with pytest.raises(ValueError, match="--test_split: digits has no named splits"):
        run.dataset_splits("digits", test_split="test")
    with pytest.raises(FileNotFoundError, match="--path is empty"):
        run.dataset_splits("folder")
    (test_dir / "extra_class").mkdir()
    __import__("shutil").copy(next((test_dir / "3").iterdir()), test_dir / "extra_class" / "x.png")
    with pytest.raises(ValueError, match=r"has classes \['extra_class'\] that the train folder does not"):
        run.dataset_splits("folder", path=str(train_dir), test_path=str(test_dir))
    with pytest.raises(ValueError, match="no class sub-folders"):
        run.dataset_splits("folder", path=str(train_dir / "3"))


def test_cli_on_folders_reports_the_pixel_baseline(tmp_path):
    from mlcd_jax import weights
    train_dir, test_dir = digit_folders(tmp_path / "train", "train"), digit_folders(tmp_path / "test", "test")
    weights.save_model_dir(vit.ViT(vit.vit_config("micro", image_size=32), rngs=nnx.Rngs(0)),
                           tmp_path / "model")
    cli = lambda *args: subprocess.run([sys.executable, "-m", "mlcd_jax.evaluate",
                                        f"--model={tmp_path / 'model'}", "--dataset=folder", *args],
                                       capture_output=True, text=True, cwd=tmp_path)
    result = cli(f"--path={train_dir}", f"--test_path={test_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads((tmp_path / "eval.json").read_text())
    assert (out["train"], out["test"]) == (len(list(train_dir.rglob("*.png"))),
                                           len(list(test_dir.rglob("*.png"))))
    assert out["raw_pixels"]["knn"]["accuracy"] > 0.8  # clean digits: pixels carry the class
    assert "raw pixels" in result.stdout
    missing = cli()
    assert missing.returncode == 2 and "--dataset folder needs --path" in missing.stderr
    split = cli(f"--path={train_dir}", "--test_split=test")
    assert split.returncode == 2 and "give the test images as --test_path" in split.stderr
