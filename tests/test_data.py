"""The grain input pipeline, sources, the ArrayRecord converter, and embed → labels → train."""

import io
import json
import tarfile
import time

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from mlcd_jax import config as config_lib, mesh as mesh_lib
from mlcd_jax.data import convert, input as input_lib, pipeline, sources, transforms
from mlcd_jax.labels import __main__ as labels_cli, embed, store

import cli

flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

KW = dict(batch_size=32, image_size=16, num_labels=2, seed=3, process_index=0, process_count=1)


def batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def jpeg(value, size=(12, 10), fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(np.full(size[::-1] + (3,), value, np.uint8)).save(buf, fmt)
    return buf.getvalue()


class Encoded:
    """Encoded images; records in `corrupt` are truncated (a JPEG cut at a third)."""

    def __init__(self, n=24, corrupt=()):
        self.n, self.corrupt = n, set(corrupt)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        data = jpeg(i * 10)
        return {"image_bytes": data[:len(data) // 3] if i in self.corrupt else data,
                "label": i % 5, "path": f"img{i}.jpg"}


def test_deterministic_and_reshuffled_each_epoch():
    src = sources.DigitsSource()
    a, b = batches(pipeline.dataset(src, **KW), 115), batches(pipeline.dataset(src, **KW), 115)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
    n = len(src)
    order = np.concatenate([x["index"] for x in a])
    first, second = order[:n], order[n:2 * n]
    assert sorted(first.tolist()) == list(range(n))  # each epoch is a permutation of the source
    assert sorted(second.tolist()) == list(range(n))
    assert not np.array_equal(first, second)  # the next epoch is reshuffled
    for b in a[-3:]:  # labels of later epochs are still joined by the source index
        np.testing.assert_array_equal(b["labels"][:, 0], src.labels[b["index"]])
    other_seed = batches(pipeline.dataset(src, **KW | {"seed": 4}), 1)[0]["index"]
    assert not np.array_equal(other_seed, a[0]["index"])


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_from_state(workers):
    """Deterministic for a given worker count (grain gives each worker a slice of the data)."""
    src = sources.DigitsSource()
    reference = batches(pipeline.dataset(src, **KW, workers=workers), 8)
    it = iter(pipeline.dataset(src, **KW, workers=workers))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives the JSON checkpoint
    resumed = iter(pipeline.dataset(src, **KW, workers=workers))
    resumed.set_state(state)
    for want in reference[5:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["labels"], want["labels"])


def test_processes_read_disjoint_shares_that_cover_the_data():
    src = sources.DigitsSource()
    n, procs, per = len(src), 3, 5
    seen = [np.concatenate([b["index"] for b in batches(
        pipeline.dataset(src, **KW | {"batch_size": per * procs, "process_index": p,
                                      "process_count": procs}),
        -(-n // (per * procs)))])[:n // procs]
        for p in range(procs)]
    union = np.concatenate(seen)
    assert len(union) == len(set(union.tolist()))  # disjoint
    assert len(set(union.tolist())) == n // procs * procs  # ≈ every example once per epoch


def test_corrupt_images_are_skipped_and_counted():
    ds = pipeline.dataset(Encoded(24, corrupt={3, 7, 20}), **KW | {"batch_size": 7})
    got = batches(ds, 3)  # 21 kept examples = one epoch of 24 less 3 corrupt
    assert sum(int(b["skipped"].sum()) for b in got) == 3
    kept = np.concatenate([b["index"] for b in got])
    assert sorted(kept.tolist()) == sorted(set(range(24)) - {3, 7, 20})
    for b in got:
        for image, index in zip(b["image"], b["index"]):
            assert abs(int(image.mean()) - index * 10) <= 3  # each image is its own record's


def test_train_and_eval_transforms():
    record = {"image": np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)}
    rng = np.random.default_rng(0)
    crops = [transforms.train_transform(record, rng, 16, (0.08, 1.0)) for _ in range(5)]
    assert all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 5  # random crops differ
    a, b = transforms.eval_transform(record, 16), transforms.eval_transform(record, 16)
    np.testing.assert_array_equal(a, b)
    ones = transforms.normalize(np.full((1, 3), 255, np.uint8))[0]
    np.testing.assert_allclose(ones, (1 - transforms.CLIP_MEAN) / transforms.CLIP_STD, rtol=1e-6)
    with pytest.raises(transforms.CorruptImage, match="img3.jpg"):
        transforms.decode(Encoded(5, corrupt={3})[3])


def test_eval_reads_each_example_once_in_order():
    got = list(pipeline.dataset(Encoded(10), **KW | {"batch_size": 4}, train=False))
    assert [b["index"].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_convert_folder_and_tars_to_arrayrecord(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "dog").mkdir()
    for i in range(5):
        (tmp_path / "imgs" / ("cat" if i < 3 else "dog") / f"{i}.png").write_bytes(
            jpeg(i * 40, fmt="PNG"))
    shards = convert.convert(str(tmp_path / "imgs"), str(tmp_path / "ar" / "train"),
                             shard_size=2)["shards"]
    assert [s.rsplit("/", 1)[1] for s in shards] == [f"train-{i:05d}-of-00003.array_record"
                                                     for i in range(3)]
    ar = sources.ArrayRecordSource(str(tmp_path / "ar" / "train-*.array_record"))
    folder = sources.FolderSource(tmp_path / "imgs")
    assert len(ar) == len(folder) == 5 and folder[4]["label"] == 1
    for i in range(5):
        assert ar[i]["image_bytes"] == folder[i]["image_bytes"]
    index = [json.loads(l)
             for l in (tmp_path / "ar" / "train.index.jsonl").read_text().splitlines()]
    assert index[3] == {"record": 3, "name": "dog/3.png"}

    for t in range(2):  # webdataset shards, as img2dataset writes them
        with tarfile.open(tmp_path / f"shard-{t:05d}.tar", "w") as tar:
            for k in range(3):
                for name, data in ((f"{t}{k}.jpg", jpeg(t * 100 + k)), (f"{t}{k}.txt", b"caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    convert.convert(str(tmp_path / "shard-{00000..00001}.tar"), str(tmp_path / "ar" / "web"), 100)
    web = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record"))
    assert len(web) == 6 and web[4]["image_bytes"] == jpeg(101)
    assert convert.main(["--input", str(tmp_path / "none"), "--output", str(tmp_path / "x")]) == 2


def add_to_tar(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_captions_travel_from_img2dataset_shards_and_folders(tmp_path):
    """img2dataset writes KEY.jpg beside KEY.txt (in tar shards, or files in a folder): each
    image keeps its own caption through convert, across output shards, read from any of them."""
    expected = []
    for t in range(2):
        with tarfile.open(tmp_path / f"{t:05d}.tar", "w") as tar:
            for k in range(4):
                caption = f"photo {t}-{k}: a café" if (t, k) != (1, 2) else None
                add_to_tar(tar, f"{t}{k:04d}.jpg", jpeg(t * 100 + k))
                add_to_tar(tar, f"{t}{k:04d}.json", b'{"caption": "not this one"}')
                if caption:
                    add_to_tar(tar, f"{t}{k:04d}.txt", f"  {caption}\n".encode())
                expected.append([caption] if caption else [])
    result = convert.convert(str(tmp_path / "{00000..00001}.tar"), str(tmp_path / "ar" / "web"),
                             shard_size=3)
    assert result["captioned"] == 7 and len(result["shards"]) == 3
    web = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record"))
    assert [web.captions(i) for i in range(len(web))] == expected
    assert web[5]["image_bytes"] == jpeg(101)  # captions and images in the same order
    third = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-00002-of-00003.array_record"))
    assert [third.captions(i) for i in range(2)] == expected[6:]
    held_out = sources.Subset(web, np.array([1, 6]))
    assert [held_out.captions(i) for i in range(2)] == [expected[1], expected[6]]

    # A folder as img2dataset's "files" output: the caption is the .txt beside the image.
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.png").write_bytes(jpeg(1, fmt="PNG"))
    (tmp_path / "files" / "a.txt").write_text("a red square\n")
    (tmp_path / "files" / "b.png").write_bytes(jpeg(2, fmt="PNG"))
    folder = sources.FolderSource(tmp_path / "files")
    assert len(folder) == 2 and folder.captions(0) == ["a red square"] and folder.captions(1) == []
    convert.convert(str(tmp_path / "files"), str(tmp_path / "ar" / "files"), 10)
    files = sources.ArrayRecordSource(str(tmp_path / "ar" / "files-*.array_record"))
    assert [files.captions(i) for i in range(2)] == [["a red square"], []]

    # An index that lists fewer records than the shards hold is stale: said, not misread.
    index = tmp_path / "ar" / "web.index.jsonl"
    index.write_text("".join(index.read_text().splitlines(keepends=True)[:6]))
    with pytest.raises(ValueError, match="web.index.jsonl lists 6 records.*stale"):
        sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record")).captions(0)


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


@pytest.mark.slow
def test_embed_kmeans_assign_then_train_on_digits(tmp_path):
    """The whole label pipeline on real (bundled) images, then the trainer on its labels."""
    from flax import nnx

    from mlcd_jax import weights
    from mlcd_jax.models import vit
    model = vit.ViT(vit.vit_config("micro", embed_dim=16), rngs=nnx.Rngs(0))
    weights.save_model_dir(model, tmp_path / "teacher")
    src = sources.DigitsSource()
    assert labels_cli.main(["embed", "--model", str(tmp_path / "teacher"), "--source", "digits",
                            "--out", str(tmp_path / "emb"), "--image_size", "16", "--batch_size",
                            "128", "--shard_size", "500"]) == 0
    assert len(list((tmp_path / "emb").glob("emb_*.npy"))) == 4
    shards = store.open_embeddings(tmp_path / "emb")
    assert shards.total == len(src) and shards.dim == 16
    again = embed.run(src, model, tmp_path / "emb", model_name="micro", image_size=16,
                      batch_size=128, shard_size=500)
    assert again["embedded_now"] == 0  # finished shards are never redone
    # an embedding equals the model's own output for that image
    x = transforms.normalize(transforms.eval_transform(src[600], 16)[None].astype(np.float32))
    e = np.asarray(model(x).embedding[0])
    np.testing.assert_allclose(shards.load(1)[100], e / np.linalg.norm(e), atol=2e-3)

    assert labels_cli.main(["all", "--embeddings", str(tmp_path / "emb"), "--out",
                            str(tmp_path / "lab"), "--num_centers", "24", "--num_labels", "3"]) == 0
    on_labels = ["--config.data.source=digits", f"--config.data.labels={tmp_path / 'lab'}",
                 "--config.data.num_labels=3"]
    run = lambda workdir: cli.train(workdir, *on_labels, "--config.head.num_classes=24",
                                    "--config.total_steps=6", "--config.log_every=3",
                                    "--config.checkpoint_every=3", "--config.data.workers=1")
    run(tmp_path / "run")
    logged = lambda d: {r["step"]: (r["loss"], r["skipped_images"])
                        for r in cli.records(tmp_path / d)}
    assert sorted(logged("run")) == [3, 6]

    # Resume from step 3 (the grain iterator state is in the checkpoint): steps 4-6 repeat exactly.
    import shutil
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    run(tmp_path / "resumed")
    assert logged("resumed") == logged("run")

    bad = cli.train(tmp_path / "run2", *on_labels, "--config.head.num_classes=60", expect=2)
    assert "uses K = 24 classes but config.head.num_classes = 60" in bad.stderr


def test_tfds_data_source_through_the_pipeline():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        src = sources.TfdsSource("mnist", "train")
        got = batches(pipeline.dataset(src, **KW | {"batch_size": 8}), 5)
    assert len(src) == 40
    assert got[0]["image"].shape == (8, 16, 16, 3) and got[0]["image"].dtype == np.uint8
    labels = np.concatenate([b["labels"] for b in got])
    assert labels[:, 0].min() >= 0 and labels[:, 0].max() <= 9 and (labels[:, 1] == -1).all()
    assert sorted(np.concatenate([b["index"] for b in got]).tolist()) == list(range(40))


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


def test_sixteen_bit_png_and_exif_rotation_decode_as_a_viewer_shows_them():
    gradient = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, "PNG")  # a 16-bit grayscale PNG
    decoded = np.asarray(transforms.decode({"image_bytes": buf.getvalue()}), np.float64)
    np.testing.assert_allclose(decoded[..., 0], gradient / 257, atol=1)  # not clipped to white
    # A landscape photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view).
    stored = np.zeros((10, 30, 3), np.uint8)
    stored[:, :5] = 255  # a white band at the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif, quality=95)
    shown = np.asarray(transforms.decode({"image_bytes": buf.getvalue()}))
    assert shown.shape == (30, 10, 3)  # upright: portrait
    assert shown[:5].mean() > 200 and shown[-5:].mean() < 50  # the band is now at the top


def unreadable_files(folder):
    """A folder of 6 good images and 3 that are not: empty, truncated, a text file."""
    (folder / "cls").mkdir(parents=True)
    for i in range(6):
        (folder / "cls" / f"good{i}.png").write_bytes(jpeg(i * 40, size=(40, 40), fmt="PNG"))
    (folder / "cls" / "empty.jpg").write_bytes(b"")
    (folder / "cls" / "cut.jpg").write_bytes(jpeg(9, size=(40, 40))[:100])
    (folder / "cls" / "notes.png").write_text("not an image")
    (folder / "cls" / "tiny.png").write_bytes(jpeg(5, size=(5, 5), fmt="PNG"))


def test_convert_leaves_out_and_lists_unreadable_files_and_refuses_to_mix_runs(tmp_path, capsys):
    unreadable_files(tmp_path / "imgs")
    out = str(tmp_path / "ar" / "train")
    assert convert.main(["--input", str(tmp_path / "imgs"), "--output", out,
                         "--shard_size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 3 files that are not readable images" in printed
    assert "cls/empty.jpg" in printed and "7 images" in printed
    assert ("1 images are smaller than 16 px on a side and will be upscaled: cls/tiny.png (5×5)"
            in printed)
    skipped = [json.loads(l) for l in open(f"{out}.skipped.jsonl")]
    assert sorted(s["name"] for s in skipped) == ["cls/cut.jpg", "cls/empty.jpg", "cls/notes.png"]
    # The README's glob also matches the index and the skipped list: only shards are read.
    source = sources.ArrayRecordSource(str(tmp_path / "ar" / "train*"))
    assert len(source) == 7 and len(source.files) == 3
    assert all(transforms.decode(source[i]) for i in range(7))
    assert source.name(4) == f"cls/good4.png ({out}-00001-of-00003.array_record[1])"
    # A second convert into the same prefix would leave 3 old shards beside new ones.
    assert convert.main(["--input", str(tmp_path / "imgs"), "--output", out]) == 2
    assert "3 shards of an earlier convert exist" in capsys.readouterr().err
    assert convert.main(["--input", str(tmp_path / "imgs"), "--output", out, "--overwrite"]) == 0
    assert len(sources.ArrayRecordSource(f"{out}-*.array_record")) == 7  # not 14
    assert len(convert.existing_shards(out)) == 1


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


def test_unreadable_images_are_named_by_every_stage(tmp_path, capsys):
    """Features for evaluation leave them out and say which; embed refuses, naming them (every
    record needs its label row); the pipeline carries their indices."""
    from flax import nnx

    from mlcd_jax.evaluate import features
    from mlcd_jax.models import vit
    unreadable_files(tmp_path / "imgs")
    folder = sources.FolderSource(tmp_path / "imgs")
    model = vit.ViT(vit.vit_config("micro"), rngs=nnx.Rngs(0))
    x, y = features.extract(model, folder, image_size=16, batch_size=4)
    assert len(x) == 7
    printed = capsys.readouterr().out
    assert ("3 unreadable images skipped" in printed
            and str(tmp_path / "imgs/cls/empty.jpg") in printed)
    with pytest.raises(ValueError, match=r"3 unreadable images skipped .*cut.jpg.*Every record "
                                         r"needs an embedding"):
        embed.run(folder, model, tmp_path / "emb", model_name="micro", image_size=16)


def test_embed_refuses_an_out_dir_of_another_run_and_checks_its_shards(tmp_path):
    from flax import nnx

    from mlcd_jax.models import vit
    src = sources.Subset(sources.DigitsSource(), range(40))
    model = vit.ViT(vit.vit_config("micro", embed_dim=8), rngs=nnx.Rngs(0))
    run = lambda m, s, **kw: embed.run(s, m, tmp_path / "emb", model_name="m", image_size=16,
                                       batch_size=16, shard_size=15, **kw)
    assert run(model, src)["embedded_now"] == 3
    assert run(model, src)["embedded_now"] == 0  # same images, same weights: nothing redone
    other = vit.ViT(vit.vit_config("micro", embed_dim=8), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already holds emb_00000.npy, made from other images, "
                                         "another model"):
        run(other, src)
    with pytest.raises(ValueError, match="already holds emb_00000.npy"):
        run(model, sources.Subset(sources.DigitsSource(), range(1, 32)))
    # The same weights in bf16 make (slightly) other embeddings: not mixed with float32 ones.
    half = embed.with_dtype(model, "bfloat16")
    assert half.cfg.dtype == "bfloat16" and embed.with_dtype(model, "float32") is model
    with pytest.raises(ValueError, match="already holds emb_00000.npy"):
        run(half, src)
    bf16 = embed.run(src, half, tmp_path / "emb16", model_name="m", image_size=16, batch_size=16,
                     shard_size=15)
    assert bf16["dtype"] == "bfloat16" and bf16["embedded_now"] == 3
    a32, a16 = (np.load(tmp_path / d / "emb_00000.npy").astype(np.float32)
                for d in ("emb", "emb16"))
    assert 0 < np.abs(a32 - a16).max() < 0.05  # bf16: close to float32, not equal
    # A shard that does not match the manifest (copied from elsewhere) is caught on open.
    np.save(tmp_path / "emb" / "emb_00001.npy", np.zeros((4000, 8), np.float16))
    with pytest.raises(ValueError, match="emb_00001.npy holds 4000 × 8 embeddings but .* says "
                                         "15 × 8"):
        store.open_embeddings(tmp_path / "emb")


class SlowInput(input_lib._Input):
    """Batches of a counter that take `seconds` each to make; the error `fail_at` on that batch."""

    def __init__(self, seconds, fail_at=None):
        c = config_lib.base_config()
        c.batch_size, c.grad_accum = 8, 1
        mesh = mesh_lib.make_mesh([("data", 1)], jax.devices()[:1])
        super().__init__(c, mesh_lib.batch_sharding(mesh, leading=1))
        self.seconds, self.fail_at, self.made = seconds, fail_at, 0

    def _make(self):
        time.sleep(self.seconds)
        if self.made == self.fail_at:
            raise ValueError(f"batch {self.made} is broken")
        self.made += 1
        return np.full((8, 2), self.made - 1, np.float32), np.zeros((8, 1), np.int32), None

    def _state(self):
        return {"made": self.made}

    def _set_state(self, state):
        self.made = state["made"]


class Busy:
    """A step that is still running on the devices."""

    def is_ready(self):
        return False


def test_prefetch_keeps_the_consumed_state_and_measures_idle_devices():
    inputs = SlowInput(0.05)
    inputs.set_state({"input": {"made": 3}, "skipped": 0})
    (images, _), idle = inputs.next()  # nothing running: the devices wait for the whole batch
    assert float(images[0, 0, 0]) == 3 and 0.03 < idle < 1.0
    (images, _), idle = inputs.next(in_flight=Busy())  # a step runs meanwhile: no idle time
    assert float(images[0, 0, 0]) == 4 and idle == 0.0
    time.sleep(0.3)  # the thread makes PREFETCH batches ahead, and stops
    assert inputs.made == 5 + input_lib.PREFETCH
    assert inputs.get_state() == {"input": {"made": 5}, "skipped": 0}  # consumed, not made
    (_, _), idle = inputs.next()
    assert idle < 0.03  # it was made ahead
    with pytest.raises(RuntimeError, match="after the first batch"):
        inputs.set_state({"input": {"made": 0}, "skipped": 0})


def test_prefetch_raises_the_input_error_in_the_trainer():
    inputs = SlowInput(0.0, fail_at=2)
    inputs.next(), inputs.next()
    with pytest.raises(ValueError, match="batch 2 is broken"):
        inputs.next()


def test_a_caption_that_is_not_utf8_is_read_not_fatal(tmp_path):
    """A web caption with a stray byte: read with the byte replaced, the same by the folder
    source and by convert, instead of a UnicodeDecodeError traceback in LiT."""
    (tmp_path / "a.png").write_bytes(jpeg(1, fmt="PNG"))
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n")
    assert sources.FolderSource(tmp_path).captions(0) == ["caf\ufffd au lait"]
    convert.convert(str(tmp_path), str(tmp_path / "ar" / "x"), 10)
    assert sources.ArrayRecordSource(str(tmp_path / "ar" / "x-*.array_record")).captions(0) == [
        "caf\ufffd au lait"]
