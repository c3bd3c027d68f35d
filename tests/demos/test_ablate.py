"""The ablation runner (python -m mlcd_jax.ablate) as a user runs it: label stores once per
(K, l), one pretraining per point and seed with the point's values, probes, a table of mean ±
std over seeds, a PNG per swept field, finished points skipped on a rerun."""

import json

import numpy as np
import pytest

from mlcd_jax.labels import store

from helpers import commands

# The demo's config with the micro ViT and a few steps: what is checked is the sweep's bookkeeping,
# not what the model learns (the demo's ViT took this test 76 s, the micro one 57 s).
TINY = ["--config=configs/demo.py:mlcd", "--config.total_steps=3", "--config.batch_size=32",
        "--config.log_every=3", "--config.optim.warmup_steps=1", "--config.checkpoint_every=3",
        "--config.model.size=micro"]
GRID = ["--grid=data.num_labels=1,4", "--grid=head.num_classes=16", "--seeds=2"]


def ablate(workdir, *flags, **kw):
    return commands.run("mlcd_jax.ablate", *TINY, f"--workdir={workdir}", *flags, **kw)


@pytest.mark.slow
def test_sweeps_make_labels_once_train_each_point_and_seed_and_summarize(tmp_path):
    out = ablate(tmp_path, *GRID)
    # The config has l = 4, K = 64: the grid gives three points (l = 4 is the config's own).
    runs = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
            for p in (tmp_path / "runs").glob("*/seed*/result.json")}
    assert sorted(runs) == [f"{point}/seed{s}" for point in
                            ("base", "data.num_labels=1", "head.num_classes=16") for s in (0, 1)]
    for name in runs:  # each run trained with its point's values and its seed
        c = json.loads((tmp_path / "runs" / name / "config.json").read_text())
        want = {"base": (4, 64), "data.num_labels=1": (1, 64), "head.num_classes=16": (4, 16)}
        assert (c["data"]["num_labels"], c["head"]["num_classes"]) == want[name.split("/")[0]]
        assert c["seed"] == int(name[-1]) and c["evals"]["every"] == 0
    # Label stores: one per (K, l) that a point needs, k-means once per K.
    stores = sorted(str(p.parent.relative_to(tmp_path / "labels"))
                    for p in (tmp_path / "labels").glob("*/*/labels.npy"))
    assert stores == ["K16/l4", "K64/l1", "K64/l4"]
    for where, (k, l) in (("K16/l4", (16, 4)), ("K64/l1", (64, 1))):
        labels = store.open_label_store(tmp_path / "labels" / where, num_classes=k).labels
        assert labels.shape == (1258, l) and labels.max() < k
    # The table: mean and sample standard deviation of each point's seeds.
    summary = json.loads((tmp_path / "ablation.json").read_text())
    for row in summary["rows"]:
        for probe in ("linear_probe", "knn"):
            each = [runs[f"{row['name']}/seed{s}"][probe] for s in (0, 1)]
            assert row[probe]["mean"] == pytest.approx(sum(each) / 2)
            assert row[probe]["std"] == pytest.approx(abs(each[0] - each[1]) / np.sqrt(2))
            assert 0.05 < row[probe]["mean"] <= 1
    # Label purity per store and rank, against the digits' own classes.
    purity = summary["label_purity"]
    assert sorted(purity) == stores and [len(purity[s]) for s in stores] == [4, 1, 4]
    assert all(0 <= v <= 1 for shares in purity.values() for v in shares)
    assert purity["K64/l1"][0] == purity["K64/l4"][0] > 0.8  # same centers, same first label
    table = (tmp_path / "ablation.md").read_text()
    assert "| data.num_labels | head.num_classes | linear probe | kNN | seeds |" in table
    assert "| 1 | 64 |" in table and "| 4 | 16 |" in table and table in out.stdout
    for field in ("data.num_labels", "head.num_classes"):
        assert (tmp_path / f"{field}.png").read_bytes()[:4] == b"\x89PNG"

    # A rerun trains nothing; a run killed between training and probing is probed again, and
    # gives the same numbers.
    (tmp_path / "runs" / "base" / "seed1" / "result.json").unlink()
    again = ablate(tmp_path, *GRID)
    assert again.stdout.count("done before") == 5 and "starting:" not in again.stdout
    assert json.loads((tmp_path / "runs" / "base" / "seed1" / "result.json").read_text()) \
        == runs["base/seed1"]
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"] == summary["rows"]


def test_grid_mistakes_are_one_line(tmp_path):
    for grid, message in (("--grid=data.num_labelz=1,2", "config has no field 'data.num_labelz'"),
                          ("--grid=head.sample_ratio=0.1,lots", "are not all floats"),
                          ("--grid=data.num_labels", "expected FIELD=V1,V2")):
        out = ablate(tmp_path, grid, expect=2)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = ablate(tmp_path, "--grid=data.num_labels=1", "--config.optim.lr=oops", expect=2)
    assert "Traceback" not in out.stderr


def test_label_purity_per_rank():
    """Clusters 0 and 1 are mostly class 0 (cluster 1 by a tie, broken to the lower class),
    cluster 2 class 1; the share per rank of labels that are a cluster of the image's class."""
    from mlcd_jax.labels import stats
    labels = np.array([[0, 2], [0, 1], [1, 2], [2, 0], [2, -1], [1, 0]])
    classes = np.array([0, 0, 0, 1, 1, 1])
    assert stats.purity(labels, classes, 3) == [5 / 6, 1 / 6]
