"""Cluster sizes of a label store: empty clusters, imbalance, and a histogram PNG; with a dataset,
how its records join the store (by key) and, where its classes are known, how clean the labels
are."""

from __future__ import annotations

import pathlib

import numpy as np

from mlcd_jax.labels import join, store


def joined_labels(source, s: store.LabelStore) -> tuple[np.ndarray, np.ndarray]:
    """(labels, classes) of the records of `source` that have labels (joined by key; in memory:
    for data whose classes are known, `source.labels`)."""
    joined = join.join(source, s, missing="skip")
    kept = (np.arange(len(source)) if joined.source is source       # every record has labels
            else np.asarray(joined.source.indices.array()))
    rows = kept if joined.rows is None else np.asarray(joined.rows.array())
    return np.asarray(s.labels)[rows], np.asarray(source.labels)[kept]


def compute(label_dir, source=None, chunk: int = 1 << 20) -> dict:
    """The store's cluster sizes; with `source`, its join (records with labels, without, labels
    without a record) and, where the source knows its classes, `purity`."""
    s = store.open_label_store(label_dir)
    k = s.num_classes
    top1, any_l = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for start in range(0, len(s.labels), chunk):  # memory stays O(K + chunk)
        part = np.asarray(s.labels[start:start + chunk])
        top1 += np.bincount(part[:, 0], minlength=k)
        any_l += np.bincount(part[part >= 0], minlength=k)
    nonzero = top1[top1 > 0]
    return {
        "num_examples": len(s.labels), "num_classes": k, "num_labels": s.labels.shape[1],
        "empty_clusters_top1": int((top1 == 0).sum()),
        "empty_clusters_any": int((any_l == 0).sum()),
        "size_top1": {"min": int(top1.min()), "median": float(np.median(top1)),
                      "mean": float(top1.mean()), "max": int(top1.max())},
        "imbalance_max_over_mean": float(top1.max() / top1.mean()),
        "coefficient_of_variation": float(top1.std() / top1.mean()),
        "nonempty_min": int(nonzero.min()) if nonzero.size else 0,
        "_sizes_top1": top1, "_sizes_any": any_l,
    } | ({} if source is None else _joined(source, s))


def _joined(source, s: store.LabelStore) -> dict:
    joined = join.join(source, s, missing="skip")
    out = {"join": {"how": joined.how, "records": len(source),
                    "with_labels": len(joined.source), "without_labels": joined.missing,
                    "labels_without_a_record": joined.unused}}
    if getattr(source, "labels", None) is not None:
        out["purity_by_rank"] = purity(*joined_labels(source, s), s.num_classes)
    return out


def purity(labels: np.ndarray, classes: np.ndarray, num_classes: int) -> list[float]:
    """Where the images' true classes are known: for each label rank j, the share of images whose
    j-th label is a cluster mostly of their own class (a cluster's class: the most common class
    among the images it is the first label of). How clean the extra labels are."""
    labels, classes = np.asarray(labels), np.asarray(classes)
    counts = np.zeros((num_classes, classes.max() + 1), np.int64)
    np.add.at(counts, (labels[:, 0], classes), 1)
    major = np.where(counts.sum(1) > 0, counts.argmax(1), -1)
    return [float(np.mean((labels[:, j] >= 0) & (major[labels[:, j]] == classes)))
            for j in range(labels.shape[1])]


def plot(stats: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("_sizes_top1", "first label"),
                       ("_sizes_any", f"any of {stats['num_labels']}")):
        sizes = stats[key]
        bins = np.unique(np.geomspace(1, max(2, sizes.max() + 1), 50).astype(int))
        ax.hist(np.maximum(sizes, 1), bins=bins, histtype="step", label=label)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("examples per cluster"), ax.set_ylabel("clusters")
    ax.set_title(f"K = {stats['num_classes']:,}, N = {stats['num_examples']:,}; "
                 f"empty (first label): {stats['empty_clusters_top1']:,}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
