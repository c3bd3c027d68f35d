"""Several heads in one step (RICE's region heads beside the image head): a region head's padded
and unlabelled rows count for nothing (`RegionHead.skip_unlabelled`), on 1, 2, 4 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax.config import schema
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import sharded_head as head


@pytest.mark.parametrize("loss", ["mlcd", "unicom"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_unlabelled_rows_count_for_nothing(devices, n, loss):
    """At r = 1 (every class scored: no randomness), a batch with unlabelled rows (all labels −1)
    under skip_unlabelled has the loss, metrics and gradients of the labelled rows alone; the
    unlabelled rows' gradient is 0."""
    rng = np.random.default_rng(n)
    k, d, l = 37, 16, 3
    labelled = rng.normal(size=(8, d)).astype(np.float32)
    labels = rng.integers(0, k, size=(8, l)).astype(np.int32)
    labels[:, 1:][rng.random((8, l - 1)) < 0.4] = -1
    padding = rng.normal(size=(8, d)).astype(np.float32)
    features = np.concatenate([labelled, padding])
    all_labels = np.concatenate([labels, np.full((8, l), -1, np.int32)])
    order = rng.permutation(16)  # padding spread among the labelled rows
    centers = rng.normal(size=(k, d)).astype(np.float32)
    mesh = mesh_lib.make_mesh([("data", -1)], devices[:n])
    cfg = schema.RegionHead(loss=loss, num_classes=k, sample_ratio=1.0)

    def run(features, labels, cfg):
        f = lambda x, c: head.loss(x, c, labels, key=jax.random.key(0), cfg=cfg, mesh=mesh)
        (value, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
            jnp.asarray(features), jnp.asarray(centers))
        return float(value), metrics, [np.asarray(g) for g in grads]

    mixed = run(features[order], all_labels[order], cfg)
    alone = run(labelled, labels, schema.Head(loss=loss, num_classes=k, sample_ratio=1.0))
    assert mixed[0] == pytest.approx(alone[0], rel=1e-6)
    for name in ("pos_cos", "pos_term", "neg_term", "pos_logit", "log_partition"):
        if name in alone[1]:
            assert float(mixed[1][name]) == pytest.approx(float(alone[1][name]), rel=1e-5,
                                                          abs=1e-6), name
    back = np.argsort(order)  # the gradient of each row where it was
    grad_features = mixed[2][0][back]
    scale = np.abs(alone[2][0]).max()
    np.testing.assert_allclose(grad_features[:8], alone[2][0], atol=1e-5 * scale)
    assert not grad_features[8:].any()
    np.testing.assert_allclose(mixed[2][1], alone[2][1], atol=1e-5 * np.abs(alone[2][1]).max())
    if n == 1:  # off, the same rows count (the image head's mean, as it was): another loss
        assert run(features[order], all_labels[order],
                   schema.Head(loss=loss, num_classes=k, sample_ratio=1.0))[0] != pytest.approx(
                       alone[0], rel=1e-3)


def build(devices, n, arg=None, **fields):
    """The trainer's step (step.build) for configs/test_tiny.py[:arg] on n devices."""
    from mlcd_jax.config.presets import test_tiny as tiny
    from mlcd_jax.training import step, validation
    c = tiny.get_config(arg)
    for path, value in fields.items():
        section, _, name = path.rpartition(".")
        (c if not section else c[section] if "." not in section else
         c[section.split(".")[0]][section.split(".")[1]])[name] = value
    model_cfg, head_cfg = validation.validate(c, n)
    mesh = mesh_lib.make_mesh(c.mesh, devices[:n])
    return c, mesh, step.build(c, mesh, 3, model_cfg, head_cfg)


def initial(c, built):
    return jax.jit(built.init, out_shardings=built.shardings)(jax.random.key(c.seed))


def run_steps(c, mesh, built, steps=3):
    """(losses, metrics of the last step, batches) of `steps` steps from the seeded init."""
    from mlcd_jax.training import input as input_lib
    state = initial(c, built)
    inputs = input_lib.SyntheticInput(c, built.batch_sharding)
    losses, batches = [], []
    for _ in range(steps):
        batch, _ = inputs.next()
        state, metrics = built.step_fn(state, batch)  # (the state is donated)
        losses.append(float(metrics["loss"]))
        batches.append(batch)
    return losses, metrics, batches


def test_one_head_steps_as_the_image_head_alone(devices):
    """Without region heads the step is the image head's loss and AdamW, written here as the
    step was before heads existed: the same losses, step by step."""
    import optax
    from flax import nnx

    from mlcd_jax.training import optim
    c, mesh, built = build(devices, 8)
    tx = optim.make_optimizer(c.optim, 3, centers_lr_mult=c.head.lr_mult)

    @jax.jit
    def reference(state, batch):
        images, labels = batch
        key = jax.random.fold_in(jax.random.key(c.seed), state["step"])

        def f(params):
            embedding = nnx.merge(built.graphdef, params["encoder"])(images[0]).embedding
            return head.loss(embedding, params["centers"], labels[0], key=key,
                             cfg=built.head_cfg, mesh=mesh)
        (loss, _), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}, loss

    losses, _, batches = run_steps(c, mesh, built)
    state = initial(c, built)
    for batch, want in zip(batches, losses):
        state, loss = reference(state, batch)
        assert float(loss) == pytest.approx(want, rel=1e-6)


R1 = {"head.sample_ratio": 1.0, "heads.objects.sample_ratio": 1.0, "heads.ocr.sample_ratio": 1.0}


@pytest.fixture(scope="module")
def regions_on_one_device(devices):
    """configs/test_tiny.py:regions at r = 1, one step on 1 device: made once per worker, so the
    8-device case compares with it on whichever worker it runs."""
    built = build(devices, 1, "regions", **R1)
    return built, run_steps(*built, steps=1)


@pytest.mark.parametrize("n", [1, 8])
def test_region_heads_add_their_weighted_losses(devices, n, regions_on_one_device):
    """configs/test_tiny.py:regions (an object head, UNICOM, and an OCR head, MLCD, weight 0.5)
    at r = 1: the step's loss is image + objects + 0.5 · ocr, each head's loss is head.loss of its
    own centers on the region embeddings with the step's key folded with its place, and the same
    on 1 and 8 devices (the head and the region layer alone: on 1, 2, 4, 8 in test_head.py and
    test_region_layer.py)."""
    from flax import nnx

    from mlcd_jax.models import region as region_lib
    (c, mesh, built), (losses, metrics, batches) = regions_on_one_device
    if n != 1:  # the same step on every mesh
        c, mesh, built = build(devices, n, "regions", **R1)
        losses, metrics, batches = run_steps(c, mesh, built, steps=1)
        assert losses[0] == pytest.approx(regions_on_one_device[1][0][0], rel=2e-5)
    parts = {k: float(metrics[k]) for k in ("image/loss", "objects/loss", "ocr/loss")}
    assert losses[0] == pytest.approx(parts["image/loss"] + parts["objects/loss"]
                                      + 0.5 * parts["ocr/loss"], rel=1e-6)
    images, labels, regions = batches[0]

    @jax.jit
    def each_head(params):
        encoder = nnx.merge(built.graphdef, params["encoder"])
        embedded = region_lib.embed(encoder, nnx.merge(built.region_graphdef, params["region"]),
                                    encoder(images[0]), regions["boxes"][0], images.shape[2:4])
        key = jax.random.fold_in(jax.random.key(c.seed), 0)
        return [head.loss(embedded.reshape(-1, embedded.shape[-1]),
                          params["region_centers"][h.name],
                          regions["labels"][h.name][0].reshape(-1, h.num_labels),
                          key=jax.random.fold_in(key, i), cfg=h)[0]
                for i, h in enumerate(built.region_heads, start=1)]

    for h, want in zip(built.region_heads, each_head(initial(c, built)["params"])):
        assert parts[f"{h.name}/loss"] == pytest.approx(float(want), rel=2e-5), h.name


def test_each_region_slot_carries_its_own_regions_labels(tmp_path):
    """The trainer's region batches from real records: a folder with a JSON-lines sidecar of
    boxes, two region label stores keyed RECORD_KEY#ID (written here in another order), joined
    by key; through the pipeline (eval crop: deterministic boxes) every slot's box is its
    region's box mapped by the crop, and every head's labels are that region's in that head's
    store (-1 where the store has none), padding slots all -1."""
    import json

    from mlcd_jax.data import pipeline, record_keys as keys, sources, transforms
    from mlcd_jax.labels import join, store

    from helpers.images import jpeg
    (tmp_path / "imgs").mkdir()
    boxes = {}
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(jpeg(i * 30, size=(40, 30), fmt="PNG"))
        n = (0, 1, 2, 3, 5, 4)[i]  # more regions than the 3 slots, as many, fewer, none
        xy = rng.uniform(0, 20, size=(n, 2))
        boxes[f"{i}.png"] = np.concatenate([xy, xy + rng.uniform(6, 10, size=(n, 2))], 1)
    boxes["3.png"][0] = [0, 5, 3, 12]  # outside the eval crop (x 3.75–36.25): cropped away
    (tmp_path / "r.jsonl").write_text("".join(
        json.dumps({"key": k, "boxes": b.round(1).tolist(),
                    "texts": ["12" if j == 1 else None for j in range(len(b))]}) + "\n"
        for k, b in boxes.items()))
    source = sources.FolderSource(tmp_path / "imgs", regions=str(tmp_path / "r.jsonl"))
    region_keys = [f"{source.key(i)}#{j}" for i in range(len(source))
                   for j in range(len(source.regions(i).boxes))]

    def write(name, which, l):  # a keyed store of the regions `which` picks, shuffled
        chosen = [k for k in region_keys if which(k)]
        order = np.random.default_rng(len(name)).permutation(len(chosen))
        rows = [chosen[o] for o in order]
        labels = np.array([[hash_label(k, c) for c in range(l)] for k in rows], np.int32)
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "labels.npy", labels)
        keys.build(tmp_path / name / "keys.npy", [keys.hashes(rows)], len(rows))
        store.write_region_label_manifest(tmp_path / name, num_examples=len(rows),
                                          num_classes=50, num_labels=l, kind=name,
                                          source_fingerprint="test", keys="keys.npy")
        return store.open_label_store(tmp_path / name)

    hash_label = lambda key, c: (sum(map(ord, key)) * (c + 3)) % 50
    objects = write("objects", lambda k: not k.endswith("#1"), 1)
    ocr = write("ocr", lambda k: k.endswith("#1"), 2)
    heads = {"objects": join.join_regions(source, objects, expect="objects"),
             "ocr": join.join_regions(source, ocr, expect="text")}
    batch = next(iter(pipeline.dataset(source, batch_size=6, image_size=16, num_labels=1,
                                       seed=0, train=False, process_index=0, process_count=1,
                                       regions=heads, regions_per_image=3)))
    for row, i in enumerate(batch["index"]):
        i, record = int(i), source[int(i)]
        want_boxes, kept = transforms.eval_transform(record, 16, source.regions(i).boxes)[1:]
        for slot in range(3):
            got = batch["boxes"][row, slot]
            if not got.any():  # padding: no region, or one the crop took away
                assert (batch["region_labels/objects"][row, slot] == -1).all()
                assert (batch["region_labels/ocr"][row, slot] == -1).all()
                continue
            j = int(np.argmin(np.abs(want_boxes - got).sum(1)))
            np.testing.assert_allclose(got, want_boxes[j], atol=1e-5)
            key = f"{source.key(i)}#{j}"
            for name, l in (("objects", 1), ("ocr", 2)):
                mine = (j == 1) == (name == "ocr")
                expected = [hash_label(key, c) for c in range(l)] if mine else [-1] * l
                assert batch[f"region_labels/{name}"][row, slot].tolist() == expected, (key, name)
    assert (batch["boxes"][int(np.flatnonzero(batch["index"] == 0)[0])] == 0).all()  # none
    three = int(np.flatnonzero(batch["index"] == 3)[0])  # 3 regions, 3 slots: region 0 was
    assert (batch["boxes"][three] == 0).all(1).sum() == 1  # cropped away


@pytest.mark.slow
def test_region_heads_resume_exactly_and_checkpoints_hold_every_head(tmp_path):
    """The trainer with two region heads (configs/test_tiny.py:regions): metrics per head, and
    a run resumed from its step-5 checkpoint repeats the uninterrupted one, every loss exactly."""
    import shutil

    from helpers import commands
    args = ["--config.total_steps=10", "--config.checkpoint_every=5", "--config.log_every=1"]
    first = commands.train(tmp_path / "run", *args, config="configs/test_tiny.py:regions")
    assert ("region head objects 30 × 32 centers, region head ocr 20 × 32 centers"
            in first.stdout)
    rows = commands.records(tmp_path / "run")
    assert {"objects/loss", "ocr/loss", "image/loss", "objects/pos_cos"} <= set(rows[-1])
    assert rows[-1]["loss"] < rows[0]["loss"]
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "10")
    again = commands.train(tmp_path / "resumed", *args, config="configs/test_tiny.py:regions")
    assert "resuming at step 5" in again.stdout
    assert commands.losses(tmp_path / "resumed") == commands.losses(tmp_path / "run")

    # Export: the encoder for transformers as ever, the region layers beside it, read back equal.
    from flax import nnx

    from mlcd_jax.interop import weights
    out = commands.run("mlcd_jax.interop.hf", "export", tmp_path / "run", tmp_path / "hf")
    assert "1 region layers: wrote" in out.stdout
    trained = weights.load_region_layers(tmp_path / "run")
    exported = weights.load_region_layers(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(trained))),
                    jax.tree.leaves(nnx.to_pure_dict(nnx.state(exported))), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert weights.load_region_layers(tmp_path / "hf").cfg.width == 32
    encoder, _ = weights.load_encoder(tmp_path / "hf")  # the region layer's file is not its
    assert encoder.cfg.depth == 2                       # weights
    transformers = pytest.importorskip("transformers")
    _, info = transformers.MLCDVisionModel.from_pretrained(tmp_path / "hf",
                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
