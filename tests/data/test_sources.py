"""Data sources (mlcd_jax/data/sources.py): scikit-learn's digits, tfds captions, the demo's digit
canvases, a damaged ArrayRecord file named, a caption that is not UTF-8."""

import numpy as np
import pytest

from mlcd_jax.data import convert, sources

from helpers.images import jpeg, unreadable_files


def test_tfds_captions_through_data_source(tmp_path, monkeypatch):
    """A captioned tfds dataset (COCO-captions' form: a sequence of {"text"}) read through
    tfds.data_source: every example's captions, as the dataset holds them."""
    import tensorflow_datasets as tfds
    package = tmp_path / "captioned_tfds"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "builder.py").write_text('''
import tensorflow_datasets as tfds

class CaptionedSquares(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(20, 24, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {}
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("captioned_tfds.builder")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        src = sources.TfdsSource("captioned_squares", "train")
        raw = tfds.data_source("captioned_squares", split="train")
        got = [src.captions(i) for i in range(len(src))]
        expected = [[str(t) for t in raw[i]["captions"]["text"]] for i in range(len(raw))]
        assert src[0]["image"].shape == (20, 24, 3) and src[0]["label"] == -1
    assert len(got) == 6 and got == expected and any(got)
    assert all(isinstance(t, str) for row in got for t in row)


def test_digits_are_scikit_learns_without_importing_it(monkeypatch):
    """The bundled file read directly, and scikit-learn's own loader where it has moved: both
    give what `sklearn.datasets.load_digits` gives."""
    import sklearn.datasets
    reference = sklearn.datasets.load_digits()
    with monkeypatch.context() as patch:  # the direct read must not fall back
        patch.setattr(sklearn.datasets, "load_digits", lambda: pytest.fail("fell back"))
        images, classes = sources.load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(classes, reference.target)
    monkeypatch.setattr(sources.pathlib.Path, "is_file", lambda self: False)
    images, classes = sources.load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(classes, reference.target)


def test_digits_canvas_makes_raw_pixels_weak():
    """The demo's task: the same digits, but pixels of the canvas carry little of the class."""
    from mlcd_jax.evaluate import probes
    train, test = sources.DigitsCanvasSource("train"), sources.DigitsCanvasSource("test")
    assert len(train) + len(test) == 1797 and not set(train.indices) & set(test.indices)
    np.testing.assert_array_equal(sources.DigitsCanvasSource("train").images, train.images)
    assert train.images.shape[1:] == (32, 32, 3) and train.clean.shape[1:] == (8, 8)
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)
    canvas = probes.knn(flat(train.images), train.labels, flat(test.images), test.labels)
    clean = probes.knn(flat(train.clean), train.labels, flat(test.clean), test.labels)
    assert canvas["accuracy"] < 0.6 and clean["accuracy"] > 0.9
    with pytest.raises(ValueError, match="must be train or test"):
        sources.DigitsCanvasSource("validation")


def test_a_damaged_arrayrecord_file_is_named(tmp_path):
    unreadable_files(tmp_path / "imgs")
    convert.convert(str(tmp_path / "imgs"), str(tmp_path / "train"), 100)
    (tmp_path / "train-00001-of-00002.array_record").write_bytes(b"\0" * 1000)  # not riegeli
    with pytest.raises(ValueError, match="train-00001-of-00002.array_record is not a readable "
                                         "ArrayRecord file"):
        sources.ArrayRecordSource(str(tmp_path / "train-*"))
    with pytest.raises(FileNotFoundError, match="no .array_record files match .*train.index.jsonl"
                                                "|no \\*.array_record files match"):
        sources.ArrayRecordSource(str(tmp_path / "train.index*"))


def test_a_caption_that_is_not_utf8_is_read_not_fatal(tmp_path):
    """A web caption with a stray byte: read with the byte replaced, the same by the folder
    source and by convert, instead of a UnicodeDecodeError traceback in LiT."""
    (tmp_path / "a.png").write_bytes(jpeg(1, fmt="PNG"))
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n")
    assert sources.FolderSource(tmp_path).captions(0) == ["caf\ufffd au lait"]
    convert.convert(str(tmp_path), str(tmp_path / "ar" / "x"), 10)
    assert sources.ArrayRecordSource(str(tmp_path / "ar" / "x-*.array_record")).captions(0) == [
        "caf\ufffd au lait"]
