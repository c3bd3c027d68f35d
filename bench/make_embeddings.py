"""Synthetic clustered embeddings for scale tests of the label pipeline, written shard by shard
(memory: one shard), in the format `python -m mlcd_jax.labels` reads.

    .venv/bin/python bench/make_embeddings.py --out /tmp/e10m        # 10,000,000 × 512, 9.6 GB
    /usr/bin/time -v .venv/bin/python -m mlcd_jax.labels all --embeddings /tmp/e10m \\
        --out /tmp/l10m --num_centers 1000 --num_labels 8 --niter 5  # peak RSS: "Maximum resident"
    .venv/bin/python bench/make_embeddings.py --out /tmp/e --smoke   # 1,000 × 8 (the tests)
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.labels import store  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--points", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--shard", type=int, default=500_000)
    p.add_argument("--smoke", action="store_true", help="1,000 × 8 in two shards")
    a = p.parse_args(argv)
    if a.smoke:
        a.points, a.dim, a.clusters, a.shard = 1_000, 8, 10, 500
    means = np.random.default_rng(0).standard_normal((a.clusters, a.dim), dtype=np.float32)

    def shards():
        rng = np.random.default_rng(1)
        for start in range(0, a.points, a.shard):
            n = min(a.shard, a.points - start)
            yield (means[rng.integers(0, a.clusters, n)]
                   + rng.standard_normal((n, a.dim), dtype=np.float32))

    written = store.write_embeddings(a.out, shards(), model=f"synthetic-{a.points}")
    print(f"wrote {written.total:,} × {written.dim} embeddings in {len(written.files)} shards "
          f"to {a.out}")


if __name__ == "__main__":
    main()
