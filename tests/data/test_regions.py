"""Regions as data and region labels (mlcd_jax/data/regions.py, labels/embed.py --regions,
labels/ocr.py, labels/join.py:join_regions), on data laid out as the tools write it: COCO
annotation JSON (and COCO-Text / TextOCR's id-keyed form), SA-1B's per-image JSON beside each
image in its tars, JSON lines keyed by img2dataset's sample keys. Expected regions are written out
by hand here; labels are checked against float64 computations made here from the images."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from mlcd_jax.data import convert, record_keys as keys, regions, sources, tokenizer, transforms
from mlcd_jax.labels import __main__ as labels_cli, embed, join, store

W, H = 40, 30  # every test image: 40 wide, 30 high


def image_bytes(seed, fmt="PNG", size=(W, H)):
    """Noise, different for every seed: every crop of it is its own."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def regions_of(source):
    return [(source.regions(i).boxes.tolist(), source.regions(i).texts,
             source.regions(i).ids.tolist()) for i in range(len(source))]


# The COCO file: annotations interleaved across images (file order is each image's region order),
# with one box of each kind that must go, an image_id no image has, an image with no record.
COCO_ANNOTATIONS = [  # (image, bbox [x, y, w, h], text field)
    ("n0", [2, 3, 10, 8], {"utf8_string": "STOP"}),
    ("n1", [0, 0, 40, 30], {}),
    ("n0", [35, 25, 10, 10], {}),            # outside the image by 5 px
    ("n0", [5, 5, 0, 4], {}),                # empty
    ("n2", [1, 1, 1.5, 20], {}),             # a side of 1.5 px < max(2, 30 / 16)
    ("n0", [30, 20, 10.6, 10.4], {}),        # past the edge by < 1 px: clipped, kept
    ("n2", [1, 2, "x", 4], {}),              # malformed
    ("n3", [4, 4, 8, 8], {"text": "exit 12"}),
    (999, [1, 1, 5, 5], {}),                 # an image_id that images[] does not list
    ("ghost", [1, 1, 5, 5], {}),             # an image without a record
    ("n1", [10, 10, 5, 5], {"utf8_string": "  "}),  # a blank text: an object region
]
EXPECTED = [  # per record n0..n4: boxes [x0, y0, x1, y1], texts, ids
    ([[2, 3, 12, 11], [30, 20, 40, 30]], ("STOP", None), [0, 3]),
    ([[0, 0, 40, 30], [10, 10, 15, 15]], (None, None), [0, 1]),
    ([], (), []),
    ([[4, 4, 12, 12]], ("exit 12",), [0]),
    ([], (), []),
]


def coco_json(path, names=("n0", "n1", "n2", "n3", "ghost")):
    """COCO's instances layout: info, licenses, images, annotations, categories."""
    ids = {n: 100 + 7 * i for i, n in enumerate(names)}
    path.write_text(json.dumps({
        "info": {"description": "test", "version": "1.0", "year": 2026},
        "version": 20260101,  # a number the 7-character chunks below cut
        "licenses": [{"url": "http://x", "id": 1, "name": "test"}],
        "images": [{"license": 1, "file_name": f"{n}.png", "coco_url": f"http://x/{n}.png",
                    "height": H, "width": W, "date_captured": "2013-11-14 17:02:52",
                    "id": ids[n]} for n in names],
        "annotations": [{"segmentation": [[0, 0, 1, 0, 1, 1]], "area": 1.0, "iscrowd": 0,
                         "image_id": ids.get(image, image), "bbox": bbox, "category_id": 1,
                         "id": 5000 + k} | text
                        for k, (image, bbox, text) in enumerate(COCO_ANNOTATIONS)],
        "categories": [{"supercategory": "thing", "id": 1, "name": "thing"}]}))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Five images as a COCO folder (train2017/nI.png) and as tars whose samples are keyed by
    img2dataset's .json sidecars (the members keep the file names), with the COCO JSON."""
    base = tmp_path_factory.mktemp("coco")
    (base / "imgs" / "train2017").mkdir(parents=True)
    with tarfile.open(base / "00000.tar", "w") as tar:
        for i in range(5):
            (base / "imgs" / "train2017" / f"n{i}.png").write_bytes(image_bytes(i))
            add(tar, f"n{i}.png", image_bytes(i))
            add(tar, f"n{i}.json", json.dumps({"key": f"00000000{i}", "status": "success"})
                .encode())
    coco_json(base / "instances.json")
    return base


def test_coco_annotations_travel_into_the_index_of_a_folder_and_of_tars(coco, tmp_path, capsys,
                                                                         monkeypatch):
    # Read in 7-byte chunks with two images a bucket: the same regions as in one go.
    monkeypatch.setattr(regions, "READ_SIZE", 7)
    monkeypatch.setattr(regions, "IMAGES_PER_BUCKET", 2)
    assert convert.main(["--input", str(coco / "imgs"), "--output", str(tmp_path / "ar" / "f"),
                         "--regions", str(coco / "instances.json"), "--shard_size", "2"]) == 0
    out = capsys.readouterr().out
    assert ("convert: dropped 4 of 9 boxes (outside the image: 1, empty: 1, a side under the "
            "minimum: 1, not 4 finite numbers: 1): train2017/n0.png box 1 [35.0, 25.0, 45.0, "
            "35.0] on 40×30 (outside the image); train2017/n0.png box 2 [5.0, 5.0, 5.0, 9.0] on "
            "40×30 (empty); train2017/n2.png box 0 [1.0, 1.0, 2.5, 21.0] on 40×30 (a side under "
            "the minimum); train2017/n2.png box 1 [nan, nan, nan, nan] on 40×30 (not 4 finite "
            "numbers); the minimum side is max(2 px, 0.0625 × the image's shorter side)") in out
    assert "1 annotations in" in out and "name an image_id that its images do not list (e.g. 999)" \
        in out
    assert "convert: 1 of 5 annotated images in" in out and "have no record (e.g. 'ghost.png')" \
        in out
    assert "; 5 regions (2 with a text) on 3 images" in out
    folder = sources.ArrayRecordSource(str(tmp_path / "ar" / "f-*.array_record"))
    assert regions_of(folder) == EXPECTED and folder.no_regions is None
    np.testing.assert_array_equal(folder.region_counts(np.arange(5)),
                                  [[2, 1], [2, 0], [0, 0], [1, 1], [0, 0]])
    assert folder.regions(0).keys(folder.key(0)) == ["train2017/n0.png#0", "train2017/n0.png#3"]
    line = json.loads((tmp_path / "ar" / "f.index.jsonl").read_text().splitlines()[0])
    assert line == {"record": 0, "key": "train2017/n0.png", "name": "train2017/n0.png",
                    "boxes": EXPECTED[0][0], "texts": ["STOP", None], "region_ids": [0, 3],
                    "classes": [0, 0]}  # category_id 1, the one category: class 0
    assert not (tmp_path / "ar" / "f.regions-work").exists()
    manifest = json.loads((tmp_path / "ar" / "f.index.json").read_text())["regions"]
    assert (manifest["regions"], manifest["with_text"], manifest["records"],
            manifest["dropped"]) == (5, 2, 3, {"outside": 1, "empty": 1, "small": 1,
                                                "malformed": 1})
    assert manifest["classes"] == ["thing"] and folder.region_classes() == ["thing"]

    # The tars: records keyed by the sidecars' keys, matched by their members' file names.
    monkeypatch.undo()
    convert.convert(str(coco / "00000.tar"), str(tmp_path / "ar" / "t"), 100,
                    regions=str(coco / "instances.json"))
    tars = sources.ArrayRecordSource(str(tmp_path / "ar" / "t-*.array_record"))
    assert [tars.key(i) for i in range(5)] == [f"00000000{i}" for i in range(5)]
    assert regions_of(tars) == EXPECTED
    assert tars.regions_fingerprint() != folder.regions_fingerprint()  # other keys

    # A folder source matches and checks the same way (sizes from the headers).
    plain = sources.FolderSource(coco / "imgs", regions=str(coco / "instances.json"))
    assert regions_of(plain) == EXPECTED
    held_out = sources.Subset(plain, np.array([3, 0]))
    assert regions_of(held_out) == [EXPECTED[3], EXPECTED[0]]
    np.testing.assert_array_equal(held_out.region_counts([0, 1]), [[1, 1], [2, 1]])
    assert pickle.loads(pickle.dumps(plain)).regions(3).texts == ("exit 12",)  # grain workers
    assert "without regions" in sources.FolderSource(coco / "imgs").no_regions

    # `--reindex` keeps them; an index converted without --regions says how to get them.
    assert convert.main(["--reindex", str(tmp_path / "ar" / "f")]) == 0
    again = sources.ArrayRecordSource(str(tmp_path / "ar" / "f-*.array_record"))
    assert regions_of(again) == EXPECTED
    assert again.regions_fingerprint() == folder.regions_fingerprint()
    convert.convert(str(coco / "imgs"), str(tmp_path / "ar" / "bare"), 100)
    bare = sources.ArrayRecordSource(str(tmp_path / "ar" / "bare-*.array_record"))
    assert "has no regions: convert with --regions" in bare.no_regions
    with pytest.raises(ValueError, match="has no regions: convert with --regions"):
        bare.regions(0)


def test_id_keyed_annotations_and_names_two_records_could_claim(coco, tmp_path, capsys):
    """COCO-Text v2 / TextOCR keep images and annotations in objects keyed by id, and name files
    with their folder; a bare file name two records share is an error naming both."""
    (tmp_path / "textocr.json").write_text(json.dumps({
        "imgs": {"a1": {"id": "a1", "file_name": "train2017/n3.png", "width": W, "height": H}},
        "anns": {"a1_1": {"id": "a1_1", "image_id": "a1", "bbox": [1, 1, 20, 9],
                          "utf8_string": "OPEN"},
                 "a1_2": {"id": "a1_2", "image_id": "a1", "bbox": [0, 10, 30, 12],
                          "utf8_string": "24h"}},
        "imgToAnns": {"a1": ["a1_1", "a1_2"]}}))
    found = sources.FolderSource(coco / "imgs", regions=str(tmp_path / "textocr.json"))
    assert regions_of(found)[3] == ([[1, 1, 21, 10], [0, 10, 30, 22]], ("OPEN", "24h"), [0, 1])
    assert [len(found.regions(i)) for i in (0, 1, 2, 4)] == [0, 0, 0, 0]

    for split in ("train", "val"):
        (tmp_path / "two" / split).mkdir(parents=True)
        (tmp_path / "two" / split / "n0.png").write_bytes(image_bytes(0))
    assert convert.main(["--input", str(tmp_path / "two"), "--output", str(tmp_path / "ar" / "x"),
                         "--regions", str(coco / "instances.json")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(err) == 1 and ("the annotations of 'n0.png' (" in err[0]
                              and "match two records, 'train/n0.png' and 'val/n0.png'; name the "
                              "image with its folder in the annotations" in err[0])
    assert not list((tmp_path / "ar").iterdir())  # nothing half-made left

    # A file cut short, and annotations that do not say their image: one line each, exit 2.
    whole = (coco / "instances.json").read_text()
    (tmp_path / "cut.json").write_text(whole[:len(whole) // 2])
    (tmp_path / "no_image.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "n0.png"}], "annotations": [{"bbox": [1, 1, 2, 2]}]}))
    for name, says in (("cut.json", "malformed JSON near byte"),
                       ("no_image.json", "an annotation has no image_id")):
        assert convert.main(["--input", str(coco / "imgs"), "--output", str(tmp_path / "ar" / "y"),
                             "--regions", str(tmp_path / name)]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
        assert len(err) == 1 and str(tmp_path / name) in err[0] and says in err[0], err
    assert not list((tmp_path / "ar").iterdir())


def test_coco_layouts_numbers_and_malformed_files(tmp_path):
    """Every top-level array or id-keyed object of images, annotations and categories is read,
    whatever its name's usual form, in the file's order; numbers are json's (ints, floats: a float
    category_id or image id still matches); malformed JSON is one line naming the file and where."""
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({
        "": [{"images": [{"id": 9, "file_name": "nested.png"}]}],  # not top-level: not an image
        "anns": [{"image_id": 2.0, "bbox": [0.5, 1.25, 3, 4.75], "category_id": 7.0}],
        "images": {"2.0": {"file_name": "b.png", "width": W, "height": H}},
        "imgs": [{"id": 1, "file_name": "a.png"}],
        "annotations": {"x": {"image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 3},
                        "y": {"image_id": "2.0", "bbox": [0.1, 0.2, 0.3, 0.4]}},
        "cats": {"3": {"name": "three"}}, "categories": [{"id": 7, "name": "seven"}]}))
    meta = {}
    raws = list(regions._read_coco(path, tmp_path, meta))
    assert [(r.key, r.boxes.tolist(), r.classes, r.size) for r in raws] == [
        ("b.png", [[0.5, 1.25, 3.5, 6.0], [0.1, 0.2, 0.1 + 0.3, 0.2 + 0.4]], [1, -1], (W, H)),
        ("a.png", [[1, 2, 4, 6]], [0], None)]
    assert meta["classes"] == ["three", "seven"]

    whole = json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                        "annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4]}] * 500})
    cut, bad = whole[:-100], whole.replace("[1, 2, 3, 4]", "[1, 2, x, 4]", 1)
    for name, text, says in (
            ("cut.json", cut, f"malformed JSON near byte {len(cut):,} ("),  # at its end
            ("bad.json", bad, f"malformed JSON near byte {regions.READ_SIZE:,} ("),  # 1st read
            ("list.json", f"[{whole}]", "expected '{' at its start (a JSON object)")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as e:
            list(regions._read_coco(tmp_path / name, tmp_path, {}))
        assert str(e.value).startswith(f"{tmp_path / name}: {says}"), e.value
        assert str(e.value).endswith("; is it COCO-style annotation JSON?"), e.value
        assert "\n" not in str(e.value), e.value  # yajl's message is three lines

def sa1b_json(file_name, boxes, size=(W, H), image_id=1):
    """SA-1B's per-image JSON: the image, and masks with their boxes (x, y, w, h)."""
    return json.dumps({
        "image": {"image_id": image_id, "width": size[0], "height": size[1],
                  "file_name": file_name},
        "annotations": [{"bbox": b, "area": b[2] * b[3], "segmentation": {
            "size": [size[1], size[0]], "counts": "PQ0"}, "predicted_iou": 0.9,
            "point_coords": [[b[0] + 1, b[1] + 1]], "crop_box": [0, 0, *size],
            "id": 900 + k, "stability_score": 0.95} for k, b in enumerate(boxes)]})


def test_sa1b_per_image_json_in_its_tars_and_in_folders(tmp_path, capsys):
    # sa_2's JSON describes the image at twice the stored size (a resize): its boxes scale; sa_3's
    # another shape: its boxes cannot be placed and are dropped.
    samples = {"sa_1": ([[2, 2, 10, 10], [0, 0, 40, 30]], (W, H)),
               "sa_2": ([[4, 4, 20, 20], [60, 40, 20, 20]], (2 * W, 2 * H)),
               "sa_3": ([[1, 1, 10, 10]], (W, W))}
    want = [([[2, 2, 12, 12], [0, 0, 40, 30]], (None, None), [0, 1]),
            ([[2, 2, 12, 12], [30, 20, 40, 30]], (None, None), [0, 1]),
            ([], (), [])]
    (tmp_path / "sa").mkdir()
    (tmp_path / "json").mkdir()
    with tarfile.open(tmp_path / "sa_000000.tar", "w") as tar:
        for k, (name, (boxes, size)) in enumerate(samples.items()):
            data, meta = image_bytes(k, "JPEG"), sa1b_json(f"{name}.jpg", boxes, size, k)
            add(tar, f"{name}.jpg", data)
            add(tar, f"{name}.json", meta.encode())
            (tmp_path / "sa" / f"{name}.jpg").write_bytes(data)
            (tmp_path / "sa" / f"{name}.json").write_text(meta)
            (tmp_path / "json" / f"{name}.json").write_text(meta)
    convert.convert(str(tmp_path / "sa_000000.tar"), str(tmp_path / "ar" / "sa"), 100,
                    regions="beside")
    assert "(annotated for an image of another shape)" in capsys.readouterr().out
    in_tars = sources.ArrayRecordSource(str(tmp_path / "ar" / "sa-*.array_record"))
    assert [in_tars.key(i) for i in range(3)] == ["sa_1", "sa_2", "sa_3"]
    assert regions_of(in_tars) == want
    # A folder: the JSON beside each image, or a folder of them matched by file_name.
    convert.convert(str(tmp_path / "sa"), str(tmp_path / "ar" / "f"), 100, regions="beside")
    assert regions_of(sources.ArrayRecordSource(str(tmp_path / "ar" / "f-*.array_record"))) == want
    assert regions_of(sources.FolderSource(tmp_path / "sa", regions="beside")) == want
    assert regions_of(sources.FolderSource(tmp_path / "sa", regions=str(tmp_path / "json"))) == want
    # The paper's rule, an absolute minimum side (128 px at SA-1B's resolution), here 20 px:
    # only sa_1's whole-image box remains.
    strict = sources.FolderSource(tmp_path / "sa", regions="beside",
                                  region_rules=regions.Rules(min_side=20, min_fraction=0))
    assert [s.ids.tolist() for s in map(strict.regions, range(3))] == [[1], [], []]


def test_json_lines_keyed_by_img2dataset_keys(tmp_path, capsys):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for k in range(3):
            key = f"0000000{k:02d}"
            add(tar, f"{key}.png", image_bytes(k))
            add(tar, f"{key}.txt", b"a caption")
            add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
    lines = [{"key": "000000000", "boxes": [[1, 1, 11, 6], [0, 0, 2, 2]],
              "texts": ["Main St", None]},
             {"key": "000000002", "boxes": [[0, 0, 80, 60]], "size": [2 * W, 2 * H]},
             {"key": "000000007", "boxes": [[1, 1, 5, 5]]}]  # no such record: counted
    (tmp_path / "regions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert convert.main(["--input", str(tmp_path / "00000.tar"), "--output",
                         str(tmp_path / "ar" / "web"), "--regions",
                         str(tmp_path / "regions.jsonl"), "--min_region_side", "3"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 of 3 boxes (a side under the minimum: 1)" in out
    assert "1 of 3 annotated images in" in out and "(e.g. '000000007')" in out
    web = sources.ArrayRecordSource(str(tmp_path / "ar" / "web-*.array_record"))
    assert regions_of(web) == [([[1, 1, 11, 6]], ("Main St",), [0]), ([], (), []),
                               ([[0, 0, 40, 30]], (None,), [0])]
    assert web.captions(0) == ["a caption"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"boxes": [[1, 1, 2, 2]]}) + "\n")
    assert convert.main(["--input", str(tmp_path / "00000.tar"), "--output",
                         str(tmp_path / "ar" / "bad"), "--regions", str(bad)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert err == [f"error: {bad}:2: needs \"key\" (the record's key) and \"boxes\" (a list of "
                   "[x0, y0, x1, y1])"]
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[0]) + "\n")
    assert convert.main(["--input", str(tmp_path / "00000.tar"), "--output",
                         str(tmp_path / "ar" / "bad"), "--regions", str(bad)]) == 2
    assert f"one key appears twice, at {bad}:1 ('000000000') and at {bad}:2" in \
        capsys.readouterr().err
    assert not list((tmp_path / "ar").glob("bad*"))


@pytest.fixture(scope="module")
def embedded(coco, tmp_path_factory):
    """The COCO folder converted with its regions, a micro ViT teacher, its object regions'
    crops embedded (shards of 2 regions)."""
    from flax import nnx

    from mlcd_jax.interop import weights
    from mlcd_jax.models import vit
    base = tmp_path_factory.mktemp("embedded")
    convert.convert(str(coco / "imgs"), str(base / "ar" / "train"), 2,
                    regions=str(coco / "instances.json"))
    model = vit.ViT(vit.vit_config("micro", embed_dim=8), rngs=nnx.Rngs(0))
    weights.save_model_dir(model, base / "teacher")
    path = str(base / "ar" / "train-*.array_record")
    assert labels_cli.main(["embed", "--regions", "--model", str(base / "teacher"), "--source",
                            "arrayrecord", "--path", path, "--out", str(base / "emb"),
                            "--image_size", "16", "--shard_size", "2"]) == 0
    return base, model, path


def crop_embeddings(model, crops):
    """The teacher's embeddings of (encoded image, box) crops, made here: decode, cut the pixels,
    eval transform, one forward, L2-normalise in float64."""
    import jax
    from flax import nnx
    batch = []
    for data, box in crops:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        x0, y0, x1, y1 = (int(v) for v in np.round(box))
        batch.append(transforms.eval_transform({"image": pixels[y0:y1, x0:x1]}, 16))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).embedding)
    e = np.asarray(forward(state, transforms.normalize(np.stack(batch).astype(np.float32))),
                   np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["faiss", "jax"])
def test_region_labels_are_the_nearest_center_of_their_own_crop(embedded, tmp_path, backend):
    base, model, path = embedded
    source = sources.ArrayRecordSource(path)
    shards = store.open_embeddings(base / "emb")
    keyed = [k for i in range(len(shards.files)) for k in shards.keys(i)]
    rows = {k: r for r, k in enumerate(keyed)}
    vectors = np.concatenate([shards.load(i) for i in range(len(shards.files))]).astype(np.float64)
    # Every object region (none with a text), each once, and each row its own crop's embedding.
    assert sorted(keyed) == ["train2017/n0.png#3", "train2017/n1.png#0", "train2017/n1.png#1"]
    crops, order = [], []
    for i in range(len(source)):
        got = source.regions(i)
        for box, text, key in zip(got.boxes, got.texts, got.keys(source.key(i))):
            if text is None:
                crops.append((source[i]["image_bytes"], box))
                order.append(rows[key])
    np.testing.assert_allclose(vectors[order], crop_embeddings(model, crops), atol=3e-3)
    for step in (["kmeans", "--num_centers", "2"], ["assign", "--num_labels", "1"]):
        assert labels_cli.main([*step, "--embeddings", str(base / "emb"), "--out", str(tmp_path),
                                "--backend", backend]) == 0
    centers = np.load(tmp_path / "centers.npy").astype(np.float64)
    joined = join.join_regions(source, store.open_label_store(tmp_path))
    assert joined.how.startswith("regions by key (3 of 3 object regions found in ")
    labelled = 0
    for i in range(len(source)):
        mine = joined(i)
        for text, key, label, have, row in zip(mine.texts, source.regions(i).keys(source.key(i)),
                                               mine.labels, mine.labelled, mine.rows):
            assert have == (text is None)  # OCR regions are not in the object store
            if have:  # assign's rows follow the embeddings': the row of the key's embedding
                assert row == rows[key], key
                nearest = int(np.argmax(centers @ vectors[rows[key]]))
                assert label.tolist() == [nearest], key
                labelled += 1
    assert labelled == 3
    assert len({int(np.argmax(centers @ v)) for v in vectors}) == 2  # not one label for all


def test_region_embed_resumes_and_refuses_a_source_without_regions(embedded, capsys):
    base, model, path = embedded
    source = sources.ArrayRecordSource(path)
    crops = embed.region_crops(source, base / "emb", "objects")
    assert len(crops) == 3 and crops.key(2) == "train2017/n1.png#1"
    run = lambda: embed.run(crops, model, base / "emb", model_name=str(base / "teacher"),
                            image_size=16, shard_size=2)
    assert run()["embedded_now"] == 0  # a rerun redoes nothing
    (base / "emb" / "emb_00001.json").unlink()  # a run killed before shard 1 was recorded
    assert run()["embedded_now"] == 1 and run()["embedded_now"] == 0
    every = embed.region_crops(source, base / "emb", "all")
    assert len(every) == 5
    # grain reads a source from several threads at once: each record's line and crop its own.
    from concurrent.futures import ThreadPoolExecutor
    crops = [every[r]["image"] for r in range(5)]
    lines = [(source.key(i), source.regions(i).ids.tolist()) for i in range(5)]
    order = np.random.default_rng(0).integers(0, 5, 4000)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: (every[int(r)]["image"], source.key(int(r)),
                                       source.regions(int(r)).ids.tolist()), order))
    for r, (crop, *line) in zip(order, got):
        np.testing.assert_array_equal(crop, crops[r])
        assert tuple(line) == lines[r]
    folder = base / "plain"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes(image_bytes(0))
    convert.convert(str(folder), str(base / "ar" / "bare"), 10, overwrite=True)
    bare = sources.ArrayRecordSource(str(base / "ar" / "bare-*.array_record"))
    with pytest.raises(ValueError, match="--regions: .*bare.index.jsonl has no regions: convert "
                                         "with --regions"):
        embed.region_crops(bare, base / "emb_bare")
    capsys.readouterr()


def test_ocr_tags_are_the_tokenizer_ids_of_each_region_text(tmp_path):
    texts = ["STOP", "exit 12", "11 11 go", "no. 7 of 7 on 7th st", "!!"]
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, text in enumerate(texts):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(image_bytes(i))
        lines.append({"key": f"{i}.png", "boxes": [[0, 0, 20, 10], [5, 5, 30, 25]],
                      "texts": [None, text]})
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    convert.convert(str(tmp_path / "imgs"), str(tmp_path / "ar" / "t"), 100,
                    regions=str(tmp_path / "r.jsonl"))
    source = sources.ArrayRecordSource(str(tmp_path / "ar" / "t-*.array_record"))
    # A tokenizer the user has (a CLIP-form BPE saved as tokenizer.json), and ours trained here.
    given = tokenizer.train(["stop and go", "exit twelve", "seventh street"], 300)
    given.save(tmp_path / "clip")
    for name, args in (("given", ["--tokenizer", str(tmp_path / "clip")]),
                       ("ours", ["--vocab_size", "320"])):
        out = tmp_path / name
        assert labels_cli.main(["ocr", "--source", "arrayrecord", "--path",
                                str(tmp_path / "ar" / "t-*.array_record"), "--out", str(out),
                                "--num_labels", "4", *args]) == 0
        tok = tokenizer.load(tmp_path / "clip" if name == "given" else out)
        found = store.open_label_store(out)
        assert found.num_classes == tok.vocab_size and found.labels.shape == (5, 4)
        assert found.manifest["regions"]["kind"] == "ocr"
        for i, text in enumerate(texts):
            ids = [t for t in tok([text])[0].tolist() if t not in (tok.start, tok.end)]
            want = list(dict.fromkeys(ids))[:4]  # each token once, in order, cut to 4
            row = keys.lookup(found.keys(), keys.hashes([f"{i}.png#1"]))[0]
            assert found.labels[row].tolist() == want + [-1] * (4 - len(want)), (name, text)
        joined = join.join_regions(source, found)
        assert joined.how.startswith("regions by key (5 of 5 text regions found in ")
        mine = joined(1)
        assert mine.labelled.tolist() == [False, True] and (mine.labels[0] == -1).all()
    assert len(set(dict.fromkeys(tok(["no. 7 of 7 on 7th st"])[0].tolist()))) > 6  # cut to 4

    # The OCR store lacks the object regions: expected there, they are named; skip trains on.
    with pytest.raises(ValueError, match=r"5 of 10 regions of config.data.path have no labels in "
                                         r".*ours \(keys '0.png#0', '1.png#0', '2.png#0', "
                                         r"'3.png#0', '4.png#0'\): label them"):
        join.join_regions(source, store.open_label_store(tmp_path / "ours"), expect="all")
    skipped = join.join_regions(source, store.open_label_store(tmp_path / "ours"), expect="all",
                                missing="skip")
    assert "5 regions without labels skipped" in skipped.how
    again = pickle.loads(pickle.dumps(skipped))  # grain's workers map the same files
    np.testing.assert_array_equal(again(3).labels, skipped(3).labels)
