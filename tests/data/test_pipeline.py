"""The grain pipeline (mlcd_jax/data/pipeline.py): seeded, reshuffled epochs, exact resume from the
iterator state, disjoint per-process shares, corrupt records skipped and counted, the eval order, a
tfds source through it."""

import json

import numpy as np
import pytest
from absl import flags

from mlcd_jax.data import pipeline, sources

from helpers.images import Encoded

flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

KW = dict(batch_size=32, image_size=16, num_labels=2, seed=3, process_index=0, process_count=1)


def batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


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


def test_eval_reads_each_example_once_in_order():
    got = list(pipeline.dataset(Encoded(10), **KW | {"batch_size": 4}, train=False))
    assert [b["index"].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


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
