"""Labels follow images by key (mlcd_jax/data/record_keys.py, labels/join.py): img2dataset tars (a
.json
sidecar per sample, one corrupt image) converted as two prefixes in parallel and read by one glob;
clip-retrieval embeddings (img_emb/ + metadata/ parquet) in another order and partitioning, with
the corrupt image embedded and one record not embedded. Every record's labels equal the top-l of
its OWN embedding against the centers, computed here in float64: through assign (faiss; jax on 1,
2, 4, 8 devices) and the trainer's input on 1, 2, 4, 8 devices."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlcd_jax.config import schema as config_lib
from mlcd_jax.data import convert, record_keys as keys, sources
from mlcd_jax.labels import assign, jax_backend, join, stats, store
from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import input as input_lib

from helpers import commands

TARS, PER_TAR, L, K, DIM = 4, 10, 3, 7, 8
CORRUPT, NOT_EMBEDDED = (2, 3), (1, 7)  # (tar, sample)
key_of = lambda t, k: f"{t:05d}{k:04d}"  # img2dataset's keys: shard and sample
colour = lambda t, k: 3 + 6 * (t * PER_TAR + k)  # one red value per sample: the image says who


def png(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), (value, 0, 0), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def img2dataset_tars(folder, *, member=key_of, duplicate=False):
    """img2dataset's webdataset output: per sample KEY.png, KEY.txt and KEY.json (whose "key"
    is the sample key). `member` names the files otherwise: the .json's key still counts."""
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(TARS):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for k in range(PER_TAR):
                data, name = png(colour(t, k)), member(t, k)
                add(tar, f"{name}.png", data[:30] if (t, k) == CORRUPT else data)
                add(tar, f"{name}.txt", f"sample {t}-{k}".encode())
                key = key_of(t, 0 if duplicate and k == 5 else k)
                add(tar, f"{name}.json", json.dumps({"key": key, "status": "success",
                                                     "url": f"http://x/{key}.png"}).encode())


def embedding_of(key):
    rng = np.random.default_rng(int(key))
    return rng.normal(size=DIM).astype(np.float16)  # clip-retrieval stores float16


def clip_retrieval(folder, *, metadata=True):
    """clip-retrieval's output: img_emb/img_emb_N.npy and metadata/metadata_N.parquet in its own
    order and partitions, not the tars'; the corrupt image embedded, one sample not."""
    keys_ = [key_of(t, k) for t in range(TARS) for k in range(PER_TAR)
             if (t, k) != NOT_EMBEDDED]
    keys_ = [keys_[i] for i in np.random.default_rng(1).permutation(len(keys_))]
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for n, part in enumerate(np.split(np.array(keys_), [13, 22])):
        np.save(folder / "img_emb" / f"img_emb_{n}.npy", np.stack([embedding_of(k) for k in part]))
        if metadata:
            pq.write_table(pa.table({"image_path": list(part), "caption": ["c"] * len(part),
                                     "url": [f"http://x/{k}.png" for k in part],
                                     "key": list(part)}),
                           folder / "metadata" / f"metadata_{n}.parquet")
    return keys_


def expected(key, centers):
    """The top-l centers of `key`'s own embedding, float64."""
    e = embedding_of(key).astype(np.float64)
    scores = centers.astype(np.float64) @ (e / np.linalg.norm(e))
    return np.argsort(-scores, kind="stable")[:L]


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    """Two tar ranges converted in parallel (two prefixes), clip-retrieval's embeddings."""
    base = tmp_path_factory.mktemp("laion")
    img2dataset_tars(base / "tars")
    convert.convert(str(base / "tars" / "{00000..00001}.tar"), str(base / "ar" / "part-a"), 7)
    convert.convert(str(base / "tars" / "{00002..00003}.tar"), str(base / "ar" / "part-b"), 7)
    clip_retrieval(base / "emb")
    centers = store.normalize(np.random.default_rng(2).normal(size=(K, DIM)).astype(np.float32))
    np.save(base / "centers.npy", centers)
    return base, centers


def test_key_tables_find_each_key_in_bounded_buckets_and_name_duplicates(tmp_path):
    words = [f"key-{i}" for i in range(5000)]
    table = keys.build(tmp_path / "t.npy", [keys.hashes(words[:3000]), keys.hashes(words[3000:])],
                       len(words), bucket_rows=512)  # 16 buckets on disk, each sorted alone
    assert table.shape == (5000,) and (np.diff(table["hash"].astype(np.float64)) >= 0).all()
    order = np.random.default_rng(0).permutation(len(words))
    queries = keys.hashes([words[i] for i in order] + ["absent", "key-5000"])
    np.testing.assert_array_equal(keys.lookup(table, queries), list(order) + [-1, -1])
    # The same on every machine: blake2b's 16 bytes, little-endian (hash, check).
    assert keys.hashes(["ä/1.jpg"]).tobytes() == hashlib.blake2b("ä/1.jpg".encode(),
                                                                 digest_size=16).digest()
    # Two keys whose 64-bit hashes collide still meet only their own rows (the check half).
    forged = keys.hashes(["a", "b", "c"])
    forged["hash"][1] = forged["hash"][0]
    table = keys.build(tmp_path / "c.npy", [forged], 3)
    np.testing.assert_array_equal(keys.lookup(table, forged[[1, 0, 2]]), [1, 0, 2])
    wrong = forged[:1].copy()
    wrong["check"] += 1
    assert keys.lookup(table, wrong)[0] == -1
    with pytest.raises(keys.DuplicateKey, match=r"the test keys: one key appears twice, at "
                                                r"#4 and at #7"):
        keys.build(tmp_path / "d.npy", [keys.hashes(["p", "q", "r", "s", "t", "u", "v", "t"])],
                   8, describe=lambda r: f"#{r}", what="the test keys", bucket_rows=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "t.npy"]  # no leftovers


def test_convert_keys_records_by_their_sidecar_and_refuses_a_key_twice(laion, tmp_path, capsys):
    base, _ = laion
    source = sources.ArrayRecordSource(str(base / "ar" / "part-*.array_record"))
    assert len(source.files) == 6 and source.unkeyed is None  # both prefixes, one glob
    want = [key_of(t, k) for t in range(TARS) for k in range(PER_TAR) if (t, k) != CORRUPT]
    assert [source.key(i) for i in range(len(source))] == want
    assert source.name(0).startswith("00000.tar:000000000.png")
    np.testing.assert_array_equal(source.key_hashes(np.arange(len(source)))["check"],
                                  keys.hashes(want)["check"])
    skipped = [json.loads(line) for line in open(base / "ar" / "part-b.skipped.jsonl")]
    assert [(s["key"], s["name"]) for s in skipped] == [(key_of(*CORRUPT),
                                                         "00002.tar:000020003.png")]
    # Members named otherwise: the key is the .json's (sample 5 of tar 0 says it is sample 0).
    img2dataset_tars(tmp_path / "dup", member=lambda t, k: f"s{k:03d}", duplicate=True)
    assert convert.main(["--input", str(tmp_path / "dup" / "00000.tar"), "--output",
                         str(tmp_path / "ar" / "dup")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and ("one key appears twice, at record 0 ('00000.tar:s000.png', key "
                              "'000000000') and at record 5 ('00000.tar:s005.png'") in err[0]
    # Overlapping tar ranges converted in parallel, read by one glob: the join names both places.
    convert.convert(str(base / "tars" / "{00000..00001}.tar"), str(tmp_path / "ar" / "x-a"), 100)
    convert.convert(str(base / "tars" / "00001.tar"), str(tmp_path / "ar" / "x-b"), 100)
    both = sources.ArrayRecordSource(f"{tmp_path / 'ar'}/x-*.array_record")
    assign.run(base / "emb", base / "centers.npy", tmp_path / "lab", num_labels=L)
    with pytest.raises(ValueError, match=r"the records of the dataset: one key appears twice, at "
                                         r"record 1(\d) \(00001.tar:00001000\1.png .*x-a-.*key "
                                         r"'00001000\1'\) and at record 2\1 \(00001.tar:"
                                         r"00001000\1.png .*x-b-"):
        join.join(both, store.open_label_store(tmp_path / "lab"))


@pytest.mark.parametrize("backend, n", [("faiss", 1), ("jax", 1), ("jax", 2), ("jax", 4),
                                        ("jax", 8)])
def test_every_record_gets_the_labels_of_its_own_embedding(laion, tmp_path, devices, backend, n):
    base, centers = laion
    mesh = mesh_lib.make_mesh([("data", -1)], devices[:n])
    assign.run(base / "emb", base / "centers.npy", tmp_path / "lab", num_labels=L,
               backend=backend, mesh=jax_backend.label_mesh(devices[:n]))
    found = store.open_label_store(tmp_path / "lab")
    assert (found.manifest["keys"]["count"], found.manifest["keys"]["bytes_per_record"]) == (39, 24)
    embedded = clip_retrieval(tmp_path / "order")  # the embeddings' order, as written
    for row, key in enumerate(embedded):  # the store: row i is embedding i, found by its key
        assert keys.lookup(found.keys(), keys.hashes([key]))[0] == row
        np.testing.assert_array_equal(found.labels[row], expected(key, centers))

    source = sources.ArrayRecordSource(str(base / "ar" / "part-*.array_record"))
    c = config_lib.base_config()
    c.data.source, c.data.labels, c.data.num_labels = "arrayrecord", str(tmp_path / "lab"), L
    c.data.image_size, c.data.workers, c.data.flip = 8, 0, False
    c.head.num_classes, c.batch_size, c.seed = K, 8, 0
    with pytest.raises(ValueError, match=r"1 of 39 records of config.data.path have no labels in "
                                         rf".*lab \(keys '{key_of(*NOT_EMBEDDED)}'\): embed and "
                                         r"assign them, or set config.data.missing_labels=skip"):
        input_lib.join_labels(c, source)
    c.data.missing_labels = "skip"
    joined = input_lib.join_labels(c, source)
    assert len(joined.source) == 38 and (joined.missing, joined.unused) == (1, 1)
    assert joined.how.startswith("by key (38 of 39 records found in ")
    inputs = input_lib.make_train_input(c, mesh_lib.batch_sharding(mesh, leading=1), source,
                                        joined)
    assert inputs.log_values()["records_without_labels"] == 1
    by_colour = {colour(t, k): key_of(t, k) for t in range(TARS) for k in range(PER_TAR)}
    seen = []
    for _ in range(38 // 8):
        (images, labels), _ = inputs.next()
        assert images.sharding.mesh.size == n
        images, labels = np.asarray(images)[0], np.asarray(labels)[0]
        for image, row in zip(images, labels):
            key = by_colour[int(image[..., 0].mean().round())]
            np.testing.assert_array_equal(row, expected(key, centers), err_msg=key)
            seen.append(key)
    assert len(set(seen)) == len(seen) == 32 and key_of(*NOT_EMBEDDED) not in seen


def test_a_store_or_records_without_keys_join_by_position_or_name_the_fix(laion, tmp_path,
                                                                          capsys):
    base, _ = laion
    source = sources.ArrayRecordSource(str(base / "ar" / "part-*.array_record"))
    # clip-retrieval's img_emb/ without its metadata/: no keys, said once; joined by position.
    clip_retrieval(tmp_path / "bare", metadata=False)
    assign.run(tmp_path / "bare", base / "centers.npy", tmp_path / "bare_lab", num_labels=L)
    assert "has no keys beside its embeddings" in capsys.readouterr().out
    bare = store.open_label_store(tmp_path / "bare_lab")
    assert bare.keys_path is None
    positional = join.join(source, bare)
    assert positional.rows is None and positional.how.startswith("by position (")
    with pytest.raises(ValueError, match="labels 39 examples but the dataset has 38, and the "
                                         "store has no keys to join them by"):
        join.join(sources.Subset(source, range(38)), bare)

    # A store from before keys: the same, from its manifest.
    assign.run(base / "emb", base / "centers.npy", tmp_path / "lab", num_labels=L)
    manifest = json.loads((tmp_path / "lab" / "manifest.json").read_text())
    (tmp_path / "lab" / "manifest.json").write_text(json.dumps(manifest | {"keys": None}))
    assert join.join(source, store.open_label_store(tmp_path / "lab")).rows is None
    (tmp_path / "lab" / "manifest.json").write_text(json.dumps(manifest))

    # Records whose index predates keys: one line naming --reindex; after it, joined by key.
    legacy = tmp_path / "legacy"
    convert.convert(str(base / "tars" / "{00000..00003}.tar"), str(legacy / "all"), 100)
    lines = [json.loads(x) for x in (legacy / "all.index.jsonl").read_text().splitlines()]
    (legacy / "all.index.jsonl").write_text("".join(
        json.dumps({k: v for k, v in x.items() if k != "key"}) + "\n" for x in lines))
    (legacy / "all.index.hashes").unlink()
    index_json = json.loads((legacy / "all.index.json").read_text())
    (legacy / "all.index.json").write_text(json.dumps(
        {k: v for k, v in index_json.items() if k != "keys"}
        | {"format": 1, "lines_bytes": (legacy / "all.index.jsonl").stat().st_size}))
    old = sources.ArrayRecordSource(str(legacy / "all-*.array_record"))
    with pytest.raises(ValueError, match=r"joins labels by key, but the records of "
                                         r"config.data.path have none: .*all.index.jsonl has no "
                                         r"record keys .*--reindex .*legacy/all`"):
        join.join(old, store.open_label_store(tmp_path / "lab"))
    assert convert.main(["--reindex", str(legacy / "all")]) == 0
    again = sources.ArrayRecordSource(str(legacy / "all-*.array_record"))
    assert [again.key(i) for i in range(3)] == [key_of(0, k) for k in range(3)]  # the members'
    with pytest.raises(ValueError, match=r"1 of 39 records of config.data.path have no labels .*"
                                         rf"'{key_of(*NOT_EMBEDDED)}'"):
        join.join(again, store.open_label_store(tmp_path / "lab"))


def test_labels_stats_reports_the_join(laion, tmp_path):
    base, _ = laion
    assign.run(base / "emb", base / "centers.npy", tmp_path / "lab", num_labels=L)
    source = sources.ArrayRecordSource(str(base / "ar" / "part-*.array_record"))
    found = stats.compute(tmp_path / "lab", source)
    assert found["join"] == {"how": found["join"]["how"], "records": 39, "with_labels": 38,
                             "without_labels": 1, "labels_without_a_record": 1}
    assert found["num_examples"] == 39 and "purity_by_rank" not in found


@pytest.mark.slow
def test_readme_steps_run_on_img2dataset_tars_and_clip_retrieval_embeddings(laion, tmp_path):
    """Steps 1, 3 and 4 of the README as written (convert, labels all, train), each a command."""
    base, _ = laion
    out = tmp_path / "ar" / "train"
    commands.run("mlcd_jax.data.convert", "--input", base / "tars" / "{00000..00003}.tar",
                 "--output", out, "--shard_size", "16")
    commands.run("mlcd_jax.labels", "all", "--embeddings", base / "emb", "--out", tmp_path / "lab",
                 "--num_centers", K, "--num_labels", L)
    assert (tmp_path / "lab" / "keys.npy").is_file()
    args = ["--config.data.source=arrayrecord", f"--config.data.path={out}-*.array_record",
            f"--config.data.labels={tmp_path / 'lab'}", f"--config.head.num_classes={K}",
            f"--config.data.num_labels={L}", "--config.model.size=micro", "--config.batch_size=8",
            "--config.total_steps=2", "--config.log_every=1", "--config.data.image_size=16",
            "--config.data.workers=0"]
    failed = commands.train(tmp_path / "run_error", *args, expect=2)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "1 of 39 records" in errors[0]
    ran = commands.train(tmp_path / "run", *args, "--config.data.missing_labels=skip")
    assert ("labels joined by key (38 of 39 records found in" in ran.stdout
            and "1 records without labels skipped ('000010007')" in ran.stdout)
    assert [r["records_without_labels"] for r in commands.records(tmp_path / "run")] == [1, 1]
