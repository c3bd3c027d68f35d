"""Cluster labels: k-means and assign on synthetic blobs, resumability, process split, bad
stores."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mlcd_jax.labels import __main__ as cli, assign, kmeans, stats, store

K, D = 20, 32


def blobs(n=4000, k=K, d=D, noise=0.03, seed=0):
    rng = np.random.default_rng(seed)
    means = np.linalg.qr(rng.normal(size=(d, d)))[0][:k]  # orthonormal: no two blobs are close
    truth = rng.integers(0, k, n)
    return means[truth] + noise * rng.normal(size=(n, d)), truth, means


@pytest.fixture
def embedded(tmp_path):
    x, truth, means = blobs()
    shards = store.write_embeddings(tmp_path / "emb", np.array_split(x, 5), model="blobs")
    return shards, x, truth, means, tmp_path


def dense_top_l(x, centers, l):
    """Reference: float64 cosine similarities, sorted."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x.astype(np.float64) @ centers.astype(np.float64).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :l], np.sort(sims, axis=1)[:, ::-1][:, :l]


@pytest.mark.parametrize("size", [4000, 1500, 7])
def test_kmeans_sample_is_distinct_normalised_rows_in_order(embedded, size):
    """All rows (each shard read whole) or a subset (rows picked per shard): distinct rows of the
    stored float16 embeddings, in stored order, each L2-normalised (float64 reference)."""
    shards, *_ = embedded
    stored = np.concatenate([np.asarray(shards.load(i), np.float64) for i in range(5)])
    ref = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    got = kmeans.sample(shards, size, seed=3)
    assert got.shape == (size, D) and got.dtype == np.float32
    match = np.argmax(got.astype(np.float64) @ ref.T, axis=1)  # which stored row each one is
    np.testing.assert_allclose(got, ref[match], atol=1e-6)
    assert np.all(np.diff(match) > 0)  # distinct and in order
    if size == len(stored):
        np.testing.assert_array_equal(match, np.arange(len(stored)))


def test_kmeans_and_assign_recover_blobs(embedded):
    shards, x, truth, means, tmp = embedded
    assert cli.main(["all", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "lab"),
                     "--num_centers", str(K), "--num_labels", "3", "--niter", "25",
                     "--init", "kmeans++", "--nredo", "3"]) == 0
    labels = store.open_label_store(tmp / "lab", num_examples=len(x), num_classes=K).labels
    # Purity: each found cluster is (almost) one blob, and each blob one cluster.
    found = np.asarray(labels[:, 0])
    purity = sum(np.bincount(truth[found == c]).max() for c in np.unique(found)) / len(x)
    assert purity >= 0.97 and len(np.unique(found)) == K
    # Top-l order: most similar center first, against a float64 reference (x as stored: float16).
    centers = np.load(tmp / "lab" / "centers.npy")
    stored = np.concatenate([shards.load(i) for i in range(len(shards.files))]).astype(np.float64)
    want, sims = dense_top_l(stored, centers, 3)
    clear = sims[:, 0] - sims[:, 1] > 1e-4  # ignore near-ties
    np.testing.assert_array_equal(np.asarray(labels)[clear, 0], want[clear, 0])
    assert (np.asarray(labels) == want).mean() > 0.99
    s = json.loads((tmp / "lab" / "stats.json").read_text())
    assert s["num_examples"] == len(x) and s["empty_clusters_top1"] == 0
    assert (tmp / "lab" / "cluster_sizes.png").stat().st_size > 5000
    manifest = json.loads((tmp / "lab" / "manifest.json").read_text())
    assert manifest["source_fingerprint"] == shards.fingerprint()
    assert manifest["embedding_model"] == "blobs"


def test_two_level_kmeans_also_recovers(embedded):
    shards, x, truth, _, _ = embedded
    centers, info = kmeans.fit(shards, K, points_per_center=200, niter=20, two_level=3,
                               init="kmeans++", nredo=3)
    assert info["two_level"] == 3
    found = dense_top_l(x, centers, 1)[0][:, 0]
    purity = sum(np.bincount(truth[found == c]).max() for c in np.unique(found)) / len(x)
    assert purity >= 0.95


def test_assign_split_over_processes_equals_one_process(embedded):
    shards, x, _, means, tmp = embedded
    np.save(tmp / "centers.npy", means.astype(np.float32))
    assign.run(tmp / "emb", tmp / "centers.npy", tmp / "one", num_labels=4)
    assign.run(tmp / "emb", tmp / "centers.npy", tmp / "two", num_labels=4, process_index=1,
               process_count=2)
    assert not (tmp / "two" / "labels.npy").exists()  # process 1 does its shards only
    assert len(list((tmp / "two" / "parts").glob("*.npy"))) == 2  # shards 1 and 3 of 5
    assign.run(tmp / "emb", tmp / "centers.npy", tmp / "two", num_labels=4, process_index=0,
               process_count=2)
    np.testing.assert_array_equal(np.load(tmp / "two" / "labels.npy"),
                                  np.load(tmp / "one" / "labels.npy"))


def test_ivf_index_reports_recall(embedded):
    shards, x, _, _, tmp = embedded
    rng = np.random.default_rng(1)  # centers drawn from the data, as k-means would place them
    centers = (x[rng.choice(len(x), 400, replace=False)] + 0.01 * rng.normal(size=(400, D)))
    centers = centers.astype(np.float32)
    np.save(tmp / "c.npy", centers)
    result = assign.run(tmp / "emb", tmp / "c.npy", tmp / "ivf", num_labels=5, index_kind="ivf",
                        nprobe=20, recall_sample=500)
    assert 0.9 <= result["recall_at_l"] <= 1.0
    assert (json.loads((tmp / "ivf" / "manifest.json").read_text())["recall_at_l"]
            == result["recall_at_l"])
    exact = dense_top_l(x, store.normalize(centers), 5)[0]
    assert (np.load(tmp / "ivf" / "labels.npy")[:, 0] == exact[:, 0]).mean() > 0.9


@pytest.mark.slow
def test_assign_killed_half_way_then_rerun_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400_000, 64)).astype(np.float32)
    store.write_embeddings(tmp_path / "emb", np.array_split(x, 80), model="noise")
    np.save(tmp_path / "centers.npy", rng.normal(size=(4096, 64)).astype(np.float32))
    args = lambda out: [sys.executable, "-m", "mlcd_jax.labels", "assign", "--embeddings",
                        str(tmp_path / "emb"), "--centers", str(tmp_path / "centers.npy"),
                        "--out", str(out), "--num_labels", "4"]
    subprocess.run(args(tmp_path / "full"), check=True, capture_output=True)

    proc = subprocess.Popen(args(tmp_path / "killed"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed" / "parts"
    deadline = time.time() + 120
    # A part is finished once its record (part_i.json) is written, after its array: the kill may
    # land between the two, leaving an array the rerun must redo.
    while not (parts.exists() and len(list(parts.glob("part_*.json"))) >= 5):
        assert proc.poll() is None and time.time() < deadline, "assign ended before it was killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("part_*.json")))
    assert 5 <= done < 80 and not (tmp_path / "killed" / "labels.npy").exists()
    assert len(list(parts.glob("part_*.npy"))) in (done, done + 1)

    result = subprocess.run(args(tmp_path / "killed"), check=True, capture_output=True, text=True)
    assert f'"skipped_shards": {done}' in result.stdout  # finished shards were not redone
    np.testing.assert_array_equal(np.load(tmp_path / "killed" / "labels.npy"),
                                  np.load(tmp_path / "full" / "labels.npy"))


def test_clip_retrieval_embeddings_are_read(tmp_path):
    x, _, _ = blobs(n=300)
    (tmp_path / "img_emb").mkdir()
    for i, part in enumerate(np.array_split(x, 3)):  # numeric order, not lexical: 0, 1, ..., 10
        np.save(tmp_path / "img_emb" / f"img_emb_{[0, 1, 10][i]}.npy", part.astype(np.float16))
    shards = store.open_embeddings(tmp_path)
    assert shards.total == 300 and shards.dim == D and shards.model == "clip-retrieval"
    assert [f.name for f in shards.files] == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_10.npy"]


def test_bad_label_store_fails_early(embedded):
    shards, x, _, means, tmp = embedded
    np.save(tmp / "centers.npy", means.astype(np.float32))
    assign.run(tmp / "emb", tmp / "centers.npy", tmp / "lab", num_labels=2)
    with pytest.raises(ValueError, match="labels 4000 examples but the dataset has 3999"):
        store.open_label_store(tmp / "lab", num_examples=3999)
    with pytest.raises(ValueError, match="uses K = 20 classes but config.head.num_classes = 21"):
        store.open_label_store(tmp / "lab", num_classes=21)
    labels = np.load(tmp / "lab" / "labels.npy")
    labels[123, 1] = 20
    np.save(tmp / "lab" / "labels.npy", labels)
    with pytest.raises(ValueError, match=r"row 123 is \[\d+, 20\]: ids must lie in \[-1, 20\)"):
        store.check_label_range(store.open_label_store(tmp / "lab"))
    with pytest.raises(FileNotFoundError, match="run `python -m mlcd_jax.labels assign` first"):
        store.open_label_store(tmp / "nowhere")
    np.save(tmp / "wide.npy", np.ones((K, D + 1), np.float32))
    with pytest.raises(ValueError, match="has width 33 but the embeddings"):
        assign.run(tmp / "emb", tmp / "wide.npy", tmp / "x", num_labels=2)


def test_stats_counts(embedded):
    shards, x, _, means, tmp = embedded
    centers = np.concatenate([means, -np.ones((3, D))]).astype(np.float32)  # 3 far-away centers
    np.save(tmp / "centers.npy", centers)
    assign.run(tmp / "emb", tmp / "centers.npy", tmp / "lab", num_labels=1)
    s = stats.compute(tmp / "lab")
    assert s["_sizes_top1"].sum() == len(x)
    assert s["empty_clusters_top1"] == 3 and s["num_classes"] == K + 3


def test_assign_redoes_parts_of_other_centers_or_l_and_checks_parts_at_merge(embedded, capsys):
    """Re-clustering into the same directory used to keep the old clustering's labels; a part
    changed on disk (bit rot, a copy from another shard) used to merge with exit 0."""
    shards, x, _, means, tmp = embedded
    rng = np.random.default_rng(5)
    np.save(tmp / "lab_centers.npy", means.astype(np.float32))
    assign.run(tmp / "emb", tmp / "lab_centers.npy", tmp / "lab", num_labels=2)
    new = rng.normal(size=(K, D)).astype(np.float32)  # another clustering, same K
    np.save(tmp / "lab_centers.npy", new)
    result = assign.run(tmp / "emb", tmp / "lab_centers.npy", tmp / "lab", num_labels=2)
    assert (result["skipped_shards"] == 0
            and "redoing 5 parts made from other centers" in capsys.readouterr().out)
    stored = np.concatenate([shards.load(i) for i in range(5)]).astype(np.float64)
    want, sims = dense_top_l(stored, store.normalize(new), 2)
    clear = sims[:, 0] - sims[:, 1] > 1e-3  # ignore near-ties
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.load(tmp / "lab" / "labels.npy")[clear, 0], want[clear, 0])
    result = assign.run(tmp / "emb", tmp / "lab_centers.npy", tmp / "lab", num_labels=3)
    assert (result["skipped_shards"] == 0
            and np.load(tmp / "lab" / "labels.npy").shape == (len(x), 3))
    assert assign.run(tmp / "emb", tmp / "lab_centers.npy", tmp / "lab",
                      num_labels=3)["skipped_shards"] == 5  # same inputs: nothing redone

    part = tmp / "lab" / "parts" / "part_00002.npy"
    for tamper, message in [
        (lambda a: a.__setitem__((7, 1), K + 3), "contents changed since it was written"),
        (lambda a: a.__setitem__((0, 0), (a[0, 0] + 1) % K),
         "contents changed since it was written"),
    ]:
        array = np.load(part)
        tamper(array)
        np.save(part, array)
        with pytest.raises(ValueError,
                           match=f"{part}: .*{message}.*rerun assign to redo that part"):
            assign.run(tmp / "emb", tmp / "lab_centers.npy", tmp / "lab", num_labels=3)
        again = assign.run(tmp / "emb", tmp / "lab_centers.npy", tmp / "lab", num_labels=3)
        assert again["skipped_shards"] == 4  # only the damaged part was redone
    # A part copied over from another shard, record and all.
    for suffix in (".npy", ".json"):
        shutil.copy(tmp / "lab" / "parts" / f"part_00001{suffix}", part.with_suffix(suffix))
    with pytest.raises(ValueError, match="part_00002.npy: it was made from other inputs"):
        assign.merge([tmp / "lab" / "parts" / f"part_{i:05d}.npy" for i in range(5)],
                     [json.loads((tmp / "lab" / "parts" / f"part_{i:05d}.json")
                                 .read_text())["fingerprint"]
                      if i != 2 else "expected" for i in range(5)],
                     tmp / "lab", shards, np.load(tmp / "lab_centers.npy"), 3, {"index": "flat"})


def test_label_cli_mistakes_say_what_to_do(embedded, capsys):
    shards, x, _, means, tmp = embedded
    run = lambda *args: (cli.main(list(args)), capsys.readouterr().err)
    code, err = run("stats", "--labels", str(tmp / "missing"))
    assert code == 2 and "not found: run `python -m mlcd_jax.labels assign` first" in err
    code, err = run("assign", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "lab"))
    assert code == 2 and "centers.npy not found: run `python -m mlcd_jax.labels kmeans" in err
    code, err = run("kmeans", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "lab"),
                    "--num_centers", "5000")
    assert code == 2 and "--num_centers 5,000 is more than the 4,000 embeddings" in err
    assert "points_per_center" not in err  # it cannot help
    np.save(tmp / "c.npy", means.astype(np.float32))
    code, err = run("assign", "--embeddings", str(tmp / "emb"), "--centers", str(tmp / "c.npy"),
                    "--out", str(tmp / "lab"), "--num_labels", str(K + 1))
    assert code == 2 and f"--num_labels {K + 1}: must lie in [1, K = {K}]" in err
    # Re-clustering removes the labels of the previous centers, so none are used by mistake.
    assert cli.main(["all", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "lab"),
                     "--num_centers", str(K), "--num_labels", "2", "--niter", "2"]) == 0
    assert cli.main(["kmeans", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "lab"),
                     "--num_centers", str(K), "--niter", "2", "--seed", "1"]) == 0
    assert not (tmp / "lab" / "labels.npy").exists()
    assert ("removed labels.npy and manifest.json of the previous clustering"
            in capsys.readouterr().out)


def test_few_points_per_center_is_said_once_not_by_faiss_for_every_clustering(tmp_path, capfd):
    """400 embeddings, K = 20, two levels of 8 parts: faiss would warn (from C++, on stderr) for
    each of the 9 clusterings that it has fewer than 39 points per center; `fit` says it once."""
    x = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    shards = store.write_embeddings(tmp_path / "emb", [x], model="noise")
    centers, _ = kmeans.fit(shards, 20, two_level=8, niter=5, verbose=False)
    out, err = capfd.readouterr()
    assert centers.shape == (20, 16)
    assert "WARNING" not in err + out, err  # faiss's own
    said = [line for line in out.splitlines() if line.startswith("kmeans: about")]
    assert said == ["kmeans: about 2 points per center in each of the 8 parts (faiss asks for 39): "
                    "the centers are noisier; fewer --num_centers or --two_level gives each more"]
