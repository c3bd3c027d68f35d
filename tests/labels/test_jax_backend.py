"""The jax label backend (mlcd_jax/labels/jax_backend.py) against float64 numpy written here: top-l
search and Lloyd steps on 1, 2, 4 and 8 devices with K divisible by none of them, re-seeding of
empty clusters, agreement with faiss, resume and the CLI."""

import json

import jax
import numpy as np
import pytest

from mlcd_jax.labels import __main__ as cli, assign, jax_backend, kmeans, store

K, D, L = 37, 24, 5


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def data(n=1000, k=K, d=D, seed=0):
    rng = np.random.default_rng(seed)
    return unit(rng.normal(size=(n, d))).astype(np.float32), rng.normal(size=(k, d))


def reference_top_l(x, centers, l):
    """float64 brute force: ids (most similar first, ties to the lower id) and all similarities."""
    sims = unit(x) @ unit(centers).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :l], sims


def reference_lloyd(x, centers):
    """One Lloyd step of spherical k-means in float64: each row to its most similar center, each
    center to the normalised sum of its rows (unchanged if none); the mean best similarity."""
    sims = unit(x) @ unit(centers).T
    best = np.argmax(sims, axis=1)
    sums = np.zeros(centers.shape)
    np.add.at(sums, best, unit(x))
    counts = np.bincount(best, minlength=len(centers))
    new = np.where(counts[:, None] > 0, sums / np.maximum(np.linalg.norm(sums, axis=1,
                                                                         keepdims=True), 1e-300),
                   unit(centers))
    return new, counts, sims.max(axis=1).mean()


def mesh_of(devices, n):
    return jax_backend.label_mesh(devices[:n])


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_top_l_equals_float64_brute_force(devices, n, dtype):
    x, centers = data()
    searcher = jax_backend.Searcher(centers, L, mesh=mesh_of(devices, n), dtype=dtype,
                                    rows_per_device=48)  # several blocks, the last one partial
    scores, ids = searcher.search(x)
    want, sims = reference_top_l(x, centers, L)
    assert ids.shape == (len(x), L) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < K  # padding rows of the last shard are never found
    np.testing.assert_allclose(scores, np.take_along_axis(sims, ids, 1),
                               atol=1e-5 if dtype == "float32" else 2e-3)
    ordered = np.sort(sims, axis=1)[:, ::-1]
    if dtype == "float32":
        np.testing.assert_array_equal(ids, want)
    else:  # float16 inputs: equal except where the float64 similarities nearly tie
        near_tie = np.min(np.abs(np.diff(ordered[:, :L + 1], axis=1)), axis=1) < 2e-3
        assert (ids[:, 0] == want[:, 0]).mean() >= 0.999 or np.all(
            (ids[:, 0] == want[:, 0]) | near_tie)
        assert np.all((ids == want).all(axis=1) | near_tie)
        assert (ids == want).all(axis=1).mean() >= 0.995 - near_tie.mean()


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_one_lloyd_step_equals_float64(devices, n):
    x, centers = data(seed=n)
    mesh = mesh_of(devices, n)
    dtype = jax_backend.compute_dtype("float32")
    start = jax_backend.shard_centers(centers, mesh, dtype)
    sums, counts, objective = jax_backend.lloyd(x, start, mesh=mesh, num_classes=K,
                                                blocks=jax_backend.Blocks(mesh, 40), dtype=dtype)
    new = np.asarray(jax_backend._new_centers(sums, counts, start, dtype=dtype))[:K]
    want, want_counts, want_objective = reference_lloyd(x, centers)
    np.testing.assert_array_equal(np.asarray(counts)[:K], want_counts)
    assert not np.asarray(counts)[K:].any()  # padding rows are never chosen
    np.testing.assert_allclose(new, want, atol=1e-5)
    np.testing.assert_allclose(float(objective) / len(x), want_objective, rtol=1e-5)


def test_empty_clusters_are_reseeded_by_splitting_a_large_one(devices):
    rng = np.random.default_rng(0)
    means = np.linalg.qr(rng.normal(size=(D, D)))[0][:6]
    x = unit(means[rng.integers(0, 6, 600)] + 0.03 * rng.normal(size=(600, D))).astype(np.float32)
    centers = np.concatenate([means, -means.sum(0, keepdims=True)])[[0, 1, 2, 6, 3, 6, 4, 5]]
    # centers 3 and 5 point away from every blob: no row chooses them
    mesh = mesh_of(devices, 4)
    dtype = jax_backend.compute_dtype("float32")
    start = jax_backend.shard_centers(centers, mesh, dtype)
    sums, counts, _ = jax_backend.lloyd(x, start, mesh=mesh, num_classes=8,
                                        blocks=jax_backend.Blocks(mesh, 64), dtype=dtype)
    counts = np.asarray(counts)[:8]
    assert counts[3] == counts[5] == 0
    empty = np.flatnonzero(counts == 0)
    targets, sources = jax_backend.reseed_sources(counts, empty, np.random.default_rng(0))
    np.testing.assert_array_equal(targets, empty)  # enough clusters to split for every one
    assert counts[sources].min() > 1 and len(set(sources)) == len(sources)  # points to give
    new = jax_backend._new_centers(sums, counts, start, dtype=dtype)
    split = np.asarray(jax_backend._split(new, jax.numpy.asarray(empty), jax.numpy.asarray(sources),
                                          dtype=dtype))
    for e, s in zip(empty, sources):  # a near copy of the split center, nudged apart from it
        assert 0.999 < split[e] @ split[s] < 1.0
    np.testing.assert_allclose(np.linalg.norm(split[:8], axis=1), 1.0, rtol=1e-5)
    # The next step gives every cluster points again.
    _, counts, _ = jax_backend.lloyd(x, jax.device_put(split, start.sharding), mesh=mesh,
                                     num_classes=8, blocks=jax_backend.Blocks(mesh, 64),
                                     dtype=dtype)
    assert np.asarray(counts)[:8].min() > 0


def blobs(n=3000, k=12, d=D, seed=0):
    rng = np.random.default_rng(seed)
    means = np.linalg.qr(rng.normal(size=(d, d)))[0][:k]
    truth = rng.integers(0, k, n)
    return means[truth] + 0.03 * rng.normal(size=(n, d)), truth


@pytest.mark.parametrize("n", [1, 8])
def test_lloyd_never_lowers_the_objective(devices, n):
    """Random seeds from the sample; each iteration's mean cosine ≥ the last (Lloyd's algorithm
    with re-seeding only where a cluster is empty); unit-norm centers out."""
    x, _ = blobs()
    x = unit(x).astype(np.float32)
    centers, objectives = jax_backend.spherical_kmeans(x, 12, niter=8, seed=1, init="random",
                                                       mesh=mesh_of(devices, n), verbose=False)
    assert centers.shape == (12, D)
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 1.0, rtol=1e-5)
    assert all(b >= a - 1e-6 for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[-1] > 0.9  # blobs of noise 0.03: most rows sit at cosine ≈ 1


@pytest.mark.parametrize("init", ["kmeans++"])
def test_jax_and_faiss_backends_agree_on_blobs(tmp_path, init):
    x, truth = blobs()
    store.write_embeddings(tmp_path / "emb", np.array_split(x, 4), model="blobs")
    labels = {}
    for backend in ("faiss", "jax"):
        out = tmp_path / backend
        assert cli.main(["all", "--embeddings", str(tmp_path / "emb"), "--out", str(out),
                         "--num_centers", "12", "--num_labels", "3", "--niter", "20",
                         "--init", init, "--nredo", "3", "--backend", backend]) == 0
        labels[backend] = np.load(out / "labels.npy")
        found = labels[backend][:, 0]
        purity = sum(np.bincount(truth[found == c]).max() for c in np.unique(found)) / len(x)
        assert purity >= 0.99 and len(np.unique(found)) == 12, (backend, purity)
    # The same partition of the rows (cluster ids are arbitrary): a one-to-one map of ids.
    pairs = set(zip(labels["faiss"][:, 0], labels["jax"][:, 0]))
    assert len(pairs) == 12
    manifest = json.loads((tmp_path / "jax" / "manifest.json").read_text())
    assert manifest["index"] == "exact (jax, float32)"
    assert json.loads((tmp_path / "jax" / "kmeans.json").read_text())["backend"] == "jax"


def test_jax_assign_resumes_without_redoing_finished_shards(tmp_path):
    x, centers = data(n=2000)
    store.write_embeddings(tmp_path / "emb", np.array_split(x, 5), model="noise")
    np.save(tmp_path / "centers.npy", centers.astype(np.float32))
    run = lambda out: assign.run(tmp_path / "emb", tmp_path / "centers.npy", out, num_labels=L,
                                 backend="jax")
    full = run(tmp_path / "full")
    assert full["assigned_now"] == 2000 and full["skipped_shards"] == 0
    # An interrupted run: shards 0, 1 and 3 finished, 2 and 4 not.
    (tmp_path / "cut" / "parts").mkdir(parents=True)
    for i in (0, 1, 3):
        for suffix in (".npy", ".json"):
            name = f"part_{i:05d}{suffix}"
            (tmp_path / "cut" / "parts" / name).write_bytes(
                (tmp_path / "full" / "parts" / name).read_bytes())
    resumed = run(tmp_path / "cut")
    assert resumed["skipped_shards"] == 3 and resumed["assigned_now"] == 800
    np.testing.assert_array_equal(np.load(tmp_path / "cut" / "labels.npy"),
                                  np.load(tmp_path / "full" / "labels.npy"))
    shards = store.open_embeddings(tmp_path / "emb")  # x as stored: float16
    stored = np.concatenate([shards.load(i) for i in range(len(shards.files))])
    np.testing.assert_array_equal(np.load(tmp_path / "full" / "labels.npy"),
                                  reference_top_l(stored, centers, L)[0])
    # faiss labels of the same centers are another index: its parts are redone, not mixed in.
    faiss_run = assign.run(tmp_path / "emb", tmp_path / "centers.npy", tmp_path / "cut",
                           num_labels=L, backend="faiss")
    assert faiss_run["skipped_shards"] == 0


def test_jax_backend_mistakes_are_one_line(tmp_path, capsys):
    x, _ = blobs(n=200)
    store.write_embeddings(tmp_path / "emb", [x], model="blobs")
    assert cli.main(["kmeans", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "o"),
                     "--num_centers", "5", "--init", "afkmc2", "--backend", "jax"]) == 2
    assert "random or kmeans++" in capsys.readouterr().err
    assert cli.main(["assign", "--embeddings", "e", "--out", "o", "--backend", "gpu"]) == 2
    assert "--backend=gpu" in capsys.readouterr().err


def test_auto_backend_is_faiss_on_cpu():
    assert assign.resolve_backend("auto") == "faiss"
    assert kmeans.INITS  # the faiss inits stay available


def test_reseeding_is_vectorised_and_never_splits_a_cluster_twice():
    """Thousands of empty clusters at once: distinct sources, each with points to give, drawn
    ∝ (size − 1) (a large cluster is split far more often than a small one); more empty clusters
    than clusters able to give: the rest wait for the next iteration."""
    rng = np.random.default_rng(0)
    counts = np.zeros(200_000, np.int64)
    counts[:50_000] = rng.integers(2, 5, 50_000)
    counts[50_000] = 10_000_000                    # one huge cluster
    empty = np.flatnonzero(counts == 0)[:5_000]
    hits = 0
    for seed in range(20):
        targets, sources = jax_backend.reseed_sources(counts, empty, np.random.default_rng(seed))
        assert len(targets) == len(sources) == 5_000 and len(set(sources)) == 5_000
        assert counts[sources].min() >= 2
        hits += 50_000 in sources
    assert hits == 20  # weight 10^7 − 1 against ~2 each: drawn every time
    few = np.array([3, 0, 0, 0, 2, 1])
    targets, sources = jax_backend.reseed_sources(few, np.flatnonzero(few == 0),
                                                  np.random.default_rng(0))
    assert len(targets) == 2 and set(sources) == {0, 4}
    with pytest.raises(ValueError, match="at most one point"):
        jax_backend.reseed_sources(np.array([1, 0, 1]), np.array([1]), np.random.default_rng(0))
