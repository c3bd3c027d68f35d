"""Evaluators: linear probe and kNN against known behaviour, features sharded == unsharded, CLI."""

import json

import numpy as np
import pytest
from flax import nnx

from mlcd_jax.data import sources
from mlcd_jax.evaluate import features, probes, run
from mlcd_jax.models import vit
from mlcd_jax.runtime import mesh as mesh_lib

from helpers import commands
from helpers.numerics import assert_same_math


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
    coarse = 10.0 ** np.arange(-4, 5)  # the searched grid: decades, then ±¼, ±½ around the best
    assert any(np.isclose(result["C"], c * 10.0 ** f)
               for c in coarse for f in (-.5, -.25, 0, .25, .5))
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
    one, y1, _ = features.extract(model, src, image_size=16, batch_size=32)
    many, y8, _ = features.extract(model, src, image_size=16, batch_size=32,
                                mesh=mesh_lib.make_mesh([("data", -1)], devices[:n]))
    assert_same_math(many, one)
    np.testing.assert_array_equal(y1, sources.DigitsSource().labels[:100])
    np.testing.assert_array_equal(y8, y1)


@pytest.mark.slow
def test_cli_on_a_training_workdir(tmp_path, capsys):
    # XLA's default code generation: the accuracy below moves with float rounding (a 4-step
    # tiny model's kNN accuracy is 0.312 at -O2, 0.291 with both commands at -O1).
    commands.train(tmp_path, "--config.data.source=digits", "--config.head.num_classes=10",
                   "--config.data.num_labels=1", "--config.total_steps=4", compile="")
    commands.run("mlcd_jax.evaluate", f"--model={tmp_path}", "--dataset=digits",
                 devices=1, compile="")  # trained on 8
    out = json.loads((tmp_path / "eval.json").read_text())
    assert out["train"] + out["test"] == 1797 and "step 4" in out["model"]
    # Features and labels stay aligned: far above chance (0.1), as raw pixels are.
    assert out["knn"]["accuracy"] > 0.3 and out["raw_pixels"]["knn"]["accuracy"] > 0.8
    from mlcd_jax.evaluate import __main__ as evaluate_cli
    assert evaluate_cli.main([f"--model={tmp_path / 'x'}", "--dataset=digits"]) == 2
    assert "neither a training workdir" in capsys.readouterr().err
    assert evaluate_cli.main([f"--checkpoint={tmp_path}", "--step=3", "--dataset=digits"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint 3" in err and "[4]" in err


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
    train_dir, test_dir = (digit_folders(tmp_path / "train", "train"),
                           digit_folders(tmp_path / "test", "test"))
    train, test = run.dataset_splits("folder", path=str(train_dir), test_path=str(test_dir))
    assert {train.name(i) for i in range(len(train))}.isdisjoint(
        test.name(i) for i in range(len(test)))
    assert train.class_index == test.class_index
    held_train, held_test = run.dataset_splits("folder", path=str(train_dir), test_fraction=0.25)
    names = lambda s: {s.name(i) for i in range(len(s))}
    assert names(held_train).isdisjoint(names(held_test))
    assert len(held_test) == round(len(train) * 0.25)
    with pytest.raises(ValueError, match="--test_split: folder has no named splits .* give the "
                                         "test images as --test_path"):
        run.dataset_splits("folder", path=str(train_dir), test_split="test")
    with pytest.raises(ValueError, match="--test_split: digits has no named splits"):
        run.dataset_splits("digits", test_split="test")
    with pytest.raises(FileNotFoundError, match="--path is empty"):
        run.dataset_splits("folder")
    (test_dir / "extra_class").mkdir()
    __import__("shutil").copy(next((test_dir / "3").iterdir()), test_dir / "extra_class" / "x.png")
    with pytest.raises(ValueError, match=r"has classes \['extra_class'\] that the train folder "
                                         r"does not"):
        run.dataset_splits("folder", path=str(train_dir), test_path=str(test_dir))
    with pytest.raises(ValueError, match="no class sub-folders"):
        run.dataset_splits("folder", path=str(train_dir / "3"))


@pytest.mark.slow
def test_cli_on_folders_reports_the_pixel_baseline(tmp_path, capsys):
    from mlcd_jax.interop import weights
    train_dir, test_dir = (digit_folders(tmp_path / "train", "train"),
                           digit_folders(tmp_path / "test", "test"))
    weights.save_model_dir(vit.ViT(vit.vit_config("micro", image_size=32), rngs=nnx.Rngs(0)),
                           tmp_path / "model")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = commands.run("mlcd_jax.evaluate", f"--model={tmp_path / 'model'}", "--dataset=folder",
                          f"--path={train_dir}", f"--test_path={test_dir}",
                          f"--out={tmp_path / 'out' / 'eval.json'}", cwd=elsewhere)
    assert not list(elsewhere.iterdir()) and not (tmp_path / "model" / "eval.json").exists()
    out = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert (out["train"], out["test"]) == (len(list(train_dir.rglob("*.png"))),
                                           len(list(test_dir.rglob("*.png"))))
    assert out["raw_pixels"]["knn"]["accuracy"] > 0.8  # clean digits: pixels carry the class
    assert "raw pixels" in result.stdout
    from mlcd_jax.evaluate import __main__ as evaluate_cli
    model = f"--model={tmp_path / 'model'}"
    assert evaluate_cli.main([model, "--dataset=folder"]) == 2  # --dataset: --source's old name
    assert "--source folder needs --path" in capsys.readouterr().err
    assert evaluate_cli.main([model, "--dataset=folder", f"--path={train_dir}",
                              "--test_split=test"]) == 2
    assert "give the test images as --test_path" in capsys.readouterr().err
