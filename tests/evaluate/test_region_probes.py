"""Region classes and the region and dense probes (`evaluate --regions`,
mlcd_jax/evaluate/regions.py), on the bundled digits_regions source, COCO / JSON-lines classes
through convert, and stub encoders whose features carry the class or nothing. Expected values
are computed here: glyphs found again among scikit-learn's digits, float64 means over the patches
a box overlaps, patch labels by a loop over boxes."""

import dataclasses
import io
import json
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mlcd_jax.data import convert, regions, sources, transforms
from mlcd_jax.evaluate import __main__ as evaluate_cli, regions as region_probes
from mlcd_jax.interop import weights
from mlcd_jax.interop.hf import mapping as hf
from mlcd_jax.labels import embed, join, ocr, store
from mlcd_jax.models import region as region_lib, vit
from mlcd_jax.runtime import mesh as mesh_lib


@pytest.fixture(scope="module")
def digits_regions():
    return sources.DigitsRegionsSource("train"), sources.DigitsRegionsSource("test")


def glyph_labels():
    """Each of scikit-learn's 8 × 8 digits (as the sources scale them) → its digit."""
    digits = sources.DigitsSource()
    return {img[:, :, 0].tobytes(): int(y) for img, y in zip(digits.images, digits.labels)}


def resized(glyph, size):
    return np.asarray(Image.fromarray(glyph).resize((size, size), Image.BILINEAR))


def test_digits_regions_boxes_classes_texts_keys_and_split(digits_regions):
    train, test = digits_regions
    assert "digits_regions" in sources.SOURCES and "digits_regions" in sources.LABELLED
    assert "digits_regions" in sources.WITH_SPLITS
    made = sources.make_source(types.SimpleNamespace(source="digits_regions", split="test"))
    assert made.fingerprint() == test.fingerprint()
    assert not set(train.indices) & set(test.indices)
    assert len(train) + len(test) == 1797
    assert not {train.key(i) for i in range(len(train))} & {test.key(i) for i in range(len(test))}
    label_of = glyph_labels()
    c = test.canvas
    for i in range(len(test)):
        r, image = test.regions(i), test[i]["image"][:, :, 0]
        assert r.ids.tolist() == list(range(len(r))) and r.boxes.dtype == np.float32
        assert (r.boxes >= 0).all() and (r.boxes <= c).all()
        assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 3] > r.boxes[:, 1]).all()
        assert (r.boxes == r.boxes.round()).all()
        for a in range(len(r)):  # no two boxes touch: 1 px apart at least
            for b in range(a):
                (x0, y0, x1, y1), (u0, v0, u1, v1) = r.boxes[a], r.boxes[b]
                assert x1 < u0 or u1 < x0 or y1 < v0 or v1 < y0, (i, a, b)
        glyphs = test.region_glyphs(i)
        texted = r.texted
        assert texted.sum() == 1 and texted[-1] and 3 <= len(r) <= 4
        for j, (x0, y0, x1, y1) in enumerate(r.boxes.astype(int)):
            crop = image[y0:y1, x0:x1]
            height, width = y1 - y0, x1 - x0
            if not texted[j]:  # an object: its glyph, drawn at its box, is a digit of its class
                assert r.texts[j] is None and height == width
                assert label_of[glyphs[j].tobytes()] == r.classes[j]
                np.testing.assert_array_equal(crop, resized(glyphs[j], height))
                continue
            k = glyphs[j].shape[1] // 8  # the line: k digits of side `height`, `gap` apart
            gap = (width - k * height) / (k - 1)
            assert 2 <= k <= 4 and gap in (0, 1) and r.classes[j] == -1
            digits = [glyphs[j][:, 8 * n:8 * n + 8] for n in range(k)]
            assert r.texts[j] == "".join(str(label_of[d.tobytes()]) for d in digits)
            for n, d in enumerate(digits):
                x = int(n * (height + gap))
                np.testing.assert_array_equal(crop[:, x:x + height], resized(d, height))
        objects = np.flatnonzero(~texted)
        sides = r.boxes[objects, 2] - r.boxes[objects, 0]
        assert sides[0] > sides[1:].max()  # the largest glyph is strictly the largest: its class
        assert test.labels[i] == r.classes[objects[0]]  # is the image's
        mask = np.zeros_like(image, bool)  # nothing drawn outside the boxes
        for x0, y0, x1, y1 in r.boxes.astype(int):
            mask[y0:y1, x0:x1] = True
        assert not image[~mask].any()
    counts = test.region_counts(np.arange(len(test)))
    np.testing.assert_array_equal(counts, [[len(test.regions(i)), 1] for i in range(len(test))])
    # Stable: made again, the same images, regions and keys; another seed, other layouts.
    again = sources.DigitsRegionsSource("test")
    np.testing.assert_array_equal(again.images, test.images)
    assert [again.key(i) for i in range(5)] == [f"digits_regions/test[{i}]" for i in range(5)]
    assert again.regions_fingerprint() == test.regions_fingerprint()
    other = sources.DigitsRegionsSource("test", seed=1)
    assert other.regions_fingerprint() != test.regions_fingerprint()
    assert not np.array_equal(other.images[:len(test)], test.images[:len(other)])


def test_digits_regions_go_through_crops_ocr_tags_and_the_join(digits_regions, tmp_path):
    """The region tools take the source unchanged: crops keyed by region, OCR tags, the join."""
    source = sources.Subset(digits_regions[1], range(30))
    crops = embed.region_crops(source, tmp_path / "emb", "objects")
    first = source.regions(0).of_kind("objects")
    assert len(crops) == int((source.region_counts(np.arange(30)) @ [1, -1]).sum())
    x0, y0, x1, y1 = first.boxes[1].astype(int)
    np.testing.assert_array_equal(crops[1]["image"], source[0]["image"][y0:y1, x0:x1])
    assert crops.key(1) == "digits_regions/test[0]#1"
    ocr.run(source, tmp_path / "ocr", num_labels=4, vocab_size=300)
    joined = join.join_regions(source, store.open_label_store(tmp_path / "ocr"))
    assert joined.how.startswith("regions by key (30 of 30 text regions found")
    r = joined(3)
    assert r.labelled.tolist() == [False] * (len(r.ids) - 1) + [True]
    assert r.boxes.tolist() == source.regions(3).boxes.tolist()


# --- classes through convert --------------------------------------------------------------------

def png(seed, size=(40, 30)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3),
                                                         np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_coco_categories_and_json_lines_classes_through_convert(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"n{i}.png").write_bytes(png(i))
    anns = [(0, 90), (0, 3), (1, 7), (1, None), (2, 55), (2, 3)]  # (image, category_id)
    categories = [{"id": 7, "name": "cat"}, {"id": 90, "name": "toothbrush"},
                  {"id": 3, "name": "car"}]
    body = {"images": [{"id": i, "file_name": f"n{i}.png", "width": 40, "height": 30}
                       for i in range(3)],
            "annotations": [{"image_id": i, "bbox": [k, k, 10, 10], "id": k}
                            | ({"category_id": c} if c is not None else {})
                            for k, (i, c) in enumerate(anns)]}
    want = [[2, 0], [1, -1], [-1, 0]]  # sorted ids 3, 7, 90 → 0, 1, 2; 55 unknown, none -1
    names = ["car", "cat", "toothbrush"]
    for order, layout in (("after", body | {"categories": categories}),  # COCO's own order
                          ("before", {"categories": categories} | body)):
        (tmp_path / f"{order}.json").write_text(json.dumps(layout))
        assert convert.main(["--input", str(tmp_path / "imgs"), "--output",
                             str(tmp_path / order / "c"), "--regions",
                             str(tmp_path / f"{order}.json")]) == 0
        assert "name category ids that its categories do not list (55)" in capsys.readouterr().out
        source = sources.ArrayRecordSource(str(tmp_path / order / "c-*.array_record"))
        assert [source.regions(i).classes.tolist() for i in range(3)] == want
        assert source.region_classes() == names
        assert [source.regions(i).of_kind("objects").classes.tolist() for i in range(3)] == want
    # Without categories: the ids the annotations use, sorted, named by their numbers.
    (tmp_path / "bare.json").write_text(json.dumps(body))
    folder = sources.FolderSource(tmp_path / "imgs", regions=str(tmp_path / "bare.json"))
    assert [folder.regions(i).classes.tolist() for i in range(3)] == [[3, 0], [1, -1], [2, 0]]
    assert folder.region_classes() == ["3", "7", "55", "90"]
    # --reindex keeps the classes and their digest.
    before = source.regions_fingerprint()
    assert convert.main(["--reindex", str(tmp_path / "before" / "c")]) == 0
    again = sources.ArrayRecordSource(str(tmp_path / "before" / "c-*.array_record"))
    assert again.regions_fingerprint() == before and again.region_classes() == names
    assert again.regions(0).classes.tolist() == [2, 0]

    # JSON lines: "classes" beside "boxes", null where unknown; a dropped box takes its own.
    lines = [{"key": "n0.png", "boxes": [[0, 0, 10, 10], [5, 5, 5, 9], [2, 2, 30, 20]],
              "classes": [4, 1, None]},
             {"key": "n1.png", "boxes": [[1, 1, 9, 9]]}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    folder = sources.FolderSource(tmp_path / "imgs", regions=str(tmp_path / "r.jsonl"))
    assert folder.regions(0).classes.tolist() == [4, -1]
    assert folder.regions(0).ids.tolist() == [0, 2]
    assert folder.regions(1).classes.tolist() == [-1]
    assert folder.region_classes() == ["0", "1", "2", "3", "4"]
    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0] | {"classes": [1, "dog", 2]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: \"classes\" must list one class per box"):
        sources.FolderSource(tmp_path / "imgs", regions=str(tmp_path / "bad.jsonl"))


# --- the probes ---------------------------------------------------------------------------------

def test_patch_labels_are_the_smallest_classed_box_holding_each_centre():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 24, (5, 6, 4)).astype(np.float32)
    boxes[..., 2:] = boxes[..., :2] + rng.uniform(1, 14, (5, 6, 2))
    boxes[0, 1] = boxes[0, 0]  # a tie: the first box wins
    classes = rng.integers(-1, 4, (5, 6)).astype(np.int32)
    got = region_probes.patch_labels(boxes, classes, (6, 6), 4)
    for b in range(5):
        for p in range(36):
            cx, cy = (p % 6 + 0.5) * 4, (p // 6 + 0.5) * 4
            best, label = np.inf, -1
            for j, (x0, y0, x1, y1) in enumerate(boxes[b].astype(np.float64)):
                area = (x1 - x0) * (y1 - y0)
                if classes[b, j] >= 0 and x0 <= cx < x1 and y0 <= cy < y1 and area < best:
                    best, label = area, classes[b, j]
            assert got[b, p] == label, (b, p)


def test_reservoir_keeps_every_row_under_its_cap_and_a_uniform_sample_above():
    rows = np.arange(1000)
    whole = region_probes.Reservoir(None, 0)
    for chunk in np.array_split(rows, 7):
        whole.add(x=chunk, y=-chunk)
    np.testing.assert_array_equal(whole.get("x"), rows)
    hits = np.zeros(1000)
    for seed in range(200):
        sample = region_probes.Reservoir(100, seed)
        for chunk in np.array_split(rows, 13):
            sample.add(x=chunk, y=-chunk)
        x = sample.get("x")
        assert len(x) == len(sample) == 100 and len(set(x)) == 100
        np.testing.assert_array_equal(sample.get("y"), -x)
        hits[x] += 1
    # Each row is kept with probability 0.1: each tenth of the stream holds 2,000 of the 20,000
    # rows kept over 200 draws (sd 42); keeping the first rows (or the last) would be 20,000.
    assert abs(hits.reshape(10, 100).sum(1) - 2000).max() < 200


def pooled64(hidden, boxes, patch, grid):
    """float64 mean of the patch tokens whose square overlaps the box with positive area."""
    gh, gw = grid
    out = []
    for x0, y0, x1, y1 in boxes.astype(np.float64):
        rows = [r * gw + c for r in range(gh) for c in range(gw)
                if x0 < (c + 1) * patch and x1 > c * patch and y0 < (r + 1) * patch
                and y1 > r * patch]
        out.append(hidden[1:][rows].astype(np.float64).mean(0))
    return np.array(out)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro ViT (patch 4) and the same weights through a transformers export."""
    model = vit.ViT(vit.vit_config("micro", embed_dim=8), rngs=nnx.Rngs(1))
    exported = hf.save_vision_model(model, tmp_path_factory.mktemp("hf"))
    return model, weights.load_encoder(exported)[0]


def test_pooled_region_embeddings_are_the_float64_mean_and_survive_export(digits_regions, micro,
                                                                          devices):
    """At 24 px the 48 px canvases are halved: each box's patches found by the overlap rule,
    their tokens averaged here in float64; the transformers export gives the same."""
    model, exported = micro
    source = sources.Subset(digits_regions[1], range(12))
    mesh = mesh_lib.make_mesh([("data", -1)], devices[:4])  # batches of 8 split over 4
    got = region_probes.extract(model, source, image_size=24, batch_size=8, mesh=mesh)
    images = np.stack([transforms.eval_transform(source[i], 24) for i in range(len(source))])
    hiddens = np.asarray(nnx.jit(lambda m, x: m(x).last_hidden_state)(
        model, transforms.normalize(jnp.asarray(images, jnp.float32))))
    want, labels, patches = [], [], []
    for i, hidden in enumerate(hiddens):
        r = source.regions(i)
        boxes = r.boxes * 0.5  # 48 → 24
        classed = r.classes >= 0
        want.append(pooled64(hidden, boxes[classed], 4, (6, 6)))
        labels += r.classes[classed].tolist()
        lab = region_probes.patch_labels(boxes[None], r.classes[None], (6, 6), 4)[0]
        patches.append(hidden[1:][lab >= 0])
    want = np.concatenate(want)
    assert got.regions.get("label").tolist() == labels
    scale = np.abs(want).max()
    np.testing.assert_allclose(got.regions.get("pooled"), want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got.patches.get("x"), np.concatenate(patches), rtol=0,
                               atol=1e-5 * scale)
    assert got.counts["regions"] == sum(len(source.regions(i)) for i in range(12))
    assert got.counts["classed"] == len(labels) and got.counts["cropped_away"] == 0
    again = region_probes.extract(exported, source, image_size=24, batch_size=8, dense=False)
    np.testing.assert_allclose(again.regions.get("pooled"), got.regions.get("pooled"), rtol=0,
                               atol=1e-4)


# Stub encoders on colour-coded boxes: patch tokens that carry a box's class (its colour), or
# nothing (the same random tokens whatever the image).

SIZE, PATCH = 32, 4
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


class ColourRegions:
    """SIZE² images with 2–3 boxes on the patch grid, not touching, each filled with its class's
    colour at a random place and size (class and geometry independent)."""

    no_regions = None

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
        self.boxes, self.classes = [], []
        for i in range(n):
            taken, classes = [], []
            for _ in range(int(rng.integers(2, 4))):
                for _ in range(50):
                    w, h = (int(v) * PATCH for v in rng.integers(2, 4, 2))
                    x, y = (int(v) * PATCH for v in rng.integers(0, [(SIZE - w) // PATCH + 1,
                                                                      (SIZE - h) // PATCH + 1]))
                    if all(x + w < a or c < x or y + h < b or d < y for a, b, c, d in taken):
                        taken.append((x, y, x + w, y + h))
                        classes.append(int(rng.integers(4)))
                        self.images[i, y:y + h, x:x + w] = COLOURS[classes[-1]]
                        break
            self.boxes.append(np.array(taken, np.float32))
            self.classes.append(np.array(classes, np.int32))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": -1}

    def regions(self, i):
        n = len(self.boxes[i])
        return regions.Regions(self.boxes[i], (None,) * n, np.arange(n, dtype=np.int32),
                               self.classes[i])

    def region_counts(self, indices):
        return np.array([[len(self.boxes[i]), 0] for i in indices], np.int64)

    def region_classes(self):
        return ["red", "green", "blue", "yellow"]


@dataclasses.dataclass(frozen=True)
class StubConfig:
    patch: int = PATCH
    image_size: int = SIZE

    @property
    def image_hw(self):
        return (self.image_size, self.image_size)


class StubOutput(NamedTuple):
    last_hidden_state: jax.Array
    region_embedding: jax.Array | None


class Stub(nnx.Module):
    """Patch tokens: each patch's mean colour (`carries`) or fixed random tokens; with region
    layers, a region embedding: the mean colour inside the box in pixels (or random again)."""

    def __init__(self, carries: bool, region_layers: int = 0):
        self.cfg = StubConfig()
        self.carries, self.region_layers = carries, region_layers
        self.noise = nnx.Param(jax.random.normal(jax.random.key(0), ((SIZE // PATCH) ** 2, 6)))
        self.field = nnx.Param(jax.random.normal(jax.random.key(1), (SIZE, SIZE, 3)))

    def __call__(self, pixels, boxes=None):
        b, g = len(pixels), SIZE // PATCH
        if self.carries:
            tokens = pixels.reshape(b, g, PATCH, g, PATCH, 3).mean((2, 4)).reshape(b, g * g, 3)
            tokens = jnp.concatenate([tokens, -tokens], axis=-1)
        else:
            tokens = jnp.broadcast_to(self.noise[...], (b, g * g, 6))
        hidden = jnp.concatenate([jnp.zeros((b, 1, 6)), tokens], axis=1)
        if boxes is None or not self.region_layers:
            return StubOutput(hidden, None)
        ys, xs = jnp.meshgrid(jnp.arange(SIZE) + 0.5, jnp.arange(SIZE) + 0.5, indexing="ij")
        x0, y0, x1, y1 = (boxes[..., k, None, None] for k in range(4))
        inside = ((x0 <= xs) & (xs < x1) & (y0 <= ys) & (ys < y1)).astype(jnp.float32)
        source = pixels if self.carries else jnp.broadcast_to(self.field[...], pixels.shape)
        mean = jnp.einsum("bnyx,byxc->bnc", inside, source) / jnp.maximum(
            inside.sum((-1, -2))[..., None], 1)
        return StubOutput(hidden, mean)


@pytest.fixture(scope="module")
def colours():
    return ColourRegions(160, seed=0), ColourRegions(120, seed=1)


@pytest.mark.parametrize("carries", [True, False], ids=["carries_the_class", "blind"])
def test_region_and_dense_probes_near_one_when_features_carry_the_class_else_chance(colours,
                                                                                    carries):
    train, test = colours
    result = region_probes.evaluate(Stub(carries, region_layers=1), train, test, image_size=SIZE,
                                    max_patches=1000)
    r, dense = result["regions"], result["dense"]
    assert r["classes"] == ["red", "green", "blue", "yellow"]
    assert r["test"]["probed"] == sum(len(b) for b in test.boxes) == r["test"]["classed"]
    assert dense["train"]["probed"] == 1000 < dense["train"]["patches"]
    accuracies = [r["pooled_patches"]["linear_probe"]["accuracy"],
                  r["pooled_patches"]["knn"]["accuracy"],
                  r["region_layer"]["linear_probe"]["accuracy"],
                  r["region_layer"]["knn"]["accuracy"],
                  dense["linear_probe"]["accuracy"]]
    if carries:
        assert min(accuracies) > 0.98, accuracies
    else:  # chance is 1/4: ~300 test regions, sd 0.025
        assert max(accuracies) < 0.4, accuracies


def test_region_layer_embeddings_follow_their_regions(colours):
    """The region layer's rows are each classed region's own embedding, in record order, the
    padding and the unclassed regions left out (a stub until the ViT has region layers)."""
    train, _ = colours
    source = sources.Subset(train, range(20))
    model = Stub(True, region_layers=1)
    got = region_probes.extract(model, source, image_size=SIZE, batch_size=8, dense=False)
    boxes = np.zeros((20, 3, 4), np.float32)  # each image's boxes, then zero boxes
    for i in range(20):
        boxes[i, :len(train.boxes[i])] = train.boxes[i]
    out = nnx.jit(lambda m, x, b: m(x, boxes=b).region_embedding)(
        model, transforms.normalize(jnp.asarray(train.images[:20], jnp.float32)), boxes)
    want = np.concatenate([np.asarray(out[i, :len(train.boxes[i])]) for i in range(20)])
    np.testing.assert_allclose(got.regions.get("layer"), want, atol=1e-6)


class Wide(ColourRegions):
    """One 48 × 32 image: its eval crop is x in [8, 40). A box inside it, one with a third of
    its area in it, one wholly left of it, and one unclassed."""

    def __init__(self):
        self.images = np.zeros((1, SIZE, 48, 3), np.uint8)
        self.boxes = [np.array([[12, 4, 20, 16], [36, 20, 48, 28], [0, 0, 8, 8], [24, 24, 32, 32]],
                               np.float32)]
        self.classes = [np.array([1, 2, 3, -1], np.int32)]
        for (x0, y0, x1, y1), c in zip(self.boxes[0].astype(int), [1, 2, 3, 0]):
            self.images[0, y0:y1, x0:x1] = COLOURS[c]


def test_boxes_follow_the_eval_crop_and_the_cropped_away_are_counted():
    source = Wide()
    model = Stub(True)
    got = region_probes.extract(model, source, image_size=SIZE, batch_size=2)
    assert got.counts == {"regions": 4, "classed": 3, "cropped_away": 2, "patches_labelled": 6,
                          "patches_in_no_box": 58}
    hidden = np.asarray(model(transforms.normalize(
        jnp.asarray(source.images[:, :, 8:40], jnp.float32))).last_hidden_state[0])
    want = pooled64(hidden, np.array([[4, 4, 12, 16]]), PATCH, (8, 8))  # 12 − 8, …
    np.testing.assert_allclose(got.regions.get("pooled"), want, atol=1e-6)
    assert got.regions.get("label").tolist() == [1] and set(got.patches.get("label")) == {1}


def test_region_layer_of_our_vit_through_the_probe(digits_regions):
    """Our ViT with its Region Transformer layer (region.WithRegions(pixels, boxes) →
    region_embedding (B, N, embed_dim)): the probe's rows are each classed region's own, in
    order (boxes halved: 48 px canvases at 24 px)."""
    cfg = vit.vit_config("micro", embed_dim=8)
    model = region_lib.WithRegions(vit.ViT(cfg, rngs=nnx.Rngs(0)),
                                   region_lib.RegionLayers(cfg, 1, rngs=nnx.Rngs(1)))
    source = sources.Subset(digits_regions[1], range(6))
    got = region_probes.extract(model, source, image_size=24, batch_size=4, dense=False)
    images = np.stack([transforms.eval_transform(source[i], 24) for i in range(6)])
    boxes = np.zeros((6, 4, 4), np.float32)  # each image's boxes, then zero boxes
    for i in range(6):
        boxes[i, :len(source.regions(i))] = source.regions(i).boxes * 0.5
    out = np.asarray(nnx.jit(lambda m, x, b: m(x, boxes=b).region_embedding)(
        model, transforms.normalize(jnp.asarray(images, jnp.float32)), boxes))
    want = np.concatenate([out[i, :len(source.regions(i))][source.regions(i).classes >= 0]
                           for i in range(6)])
    np.testing.assert_allclose(got.regions.get("layer"), want, atol=1e-5)


# --- the command --------------------------------------------------------------------------------

def test_evaluate_regions_command_on_a_folder_and_its_mistakes(colours, micro, tmp_path, capsys):
    train, test = colours
    for name, data, n in (("train", train, 40), ("test", test, 30)):
        (tmp_path / name).mkdir()
        lines = []
        for i in range(n):
            Image.fromarray(data.images[i]).save(tmp_path / name / f"{i:03d}.png")
            lines.append({"key": f"{i:03d}.png", "boxes": data.boxes[i].tolist(),
                          "classes": data.classes[i].tolist()})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = weights.save_model_dir(micro[0], tmp_path / "model")  # 16 px: the boxes halved
    args = ["--model", str(model), "--dataset", "folder", "--path", str(tmp_path / "train"),
            "--test_path", str(tmp_path / "test"), "--regions"]
    assert evaluate_cli.main(args + ["--annotations", str(tmp_path / "train.jsonl"),
                                     "--test_annotations", str(tmp_path / "test.jsonl"),
                                     "--out", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "folder: the images have no classes; only the region probes run" in out
    assert "regions: pooled patch tokens" in out and "dense: patch tokens" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert "linear_probe" not in result and "region_layer" not in result["regions"]
    assert result["regions"]["test"]["probed"] == sum(len(b) for b in test.boxes[:30])
    assert set(result["regions"]["pooled_patches"]) == {"linear_probe", "knn"}
    assert set(result["dense"]) >= {"linear_probe", "train", "test", "how"}
    # The same images converted with the same boxes: the same results from ArrayRecord files.
    for name in ("train", "test"):
        convert.convert(str(tmp_path / name), str(tmp_path / "ar" / name), 100,
                        regions=str(tmp_path / f"{name}.jsonl"))
    assert evaluate_cli.main(["--model", str(model), "--dataset", "arrayrecord", "--regions",
                              "--path", str(tmp_path / "ar" / "train-*.array_record"),
                              "--test_path", str(tmp_path / "ar" / "test-*.array_record"),
                              "--out", str(tmp_path / "ar.json")]) == 0
    converted = json.loads((tmp_path / "ar.json").read_text())
    for key in ("regions", "dense"):
        assert converted[key] == result[key]

    # Mistakes: one line each, exit 2.
    (tmp_path / "plain.jsonl").write_text("".join(
        json.dumps({"key": f"{i:03d}.png", "boxes": [[0, 0, 8, 8]]}) + "\n" for i in range(40)))
    for extra, message in (
            (["--annotations", str(tmp_path / "plain.jsonl")],
             "--regions: the train images' regions have no classes (COCO annotations' "
             "category_id, a JSON-lines \"classes\"; SA-1B's boxes have none)"),
            ([], "--regions: the train images have no regions: "),
    ):
        assert evaluate_cli.main(args + extra) == 2
        (line,) = errors(capsys)
        assert line.startswith(f"error: {message}"), line
    assert evaluate_cli.main(["--model", str(model), "--dataset", "digits_canvas",
                              "--test_split", "test", "--regions"]) == 2
    (line,) = errors(capsys)
    assert line.startswith("error: --regions: the train images have no regions: this dataset "
                           "has no boxes (a folder takes them from --annotations"), line


def errors(capsys) -> list[str]:
    """The lines of stderr that are not progress bars."""
    return [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
            if line and "it/s]" not in line and "line/s]" not in line and "B/s]" not in line
            and "img/s]" not in line]
