"""The sharded head's test inputs: features near their first positive, labels with shorter lists
and single positives (tests/training/)."""

import numpy as np

B, D, K, L = 16, 12, 37, 3  # K = 37 divides none of 2, 4, 8 devices


def make_inputs(seed=0, b=B, d=D, k=K, l=L, dtype=np.float32):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    labels = np.stack([rng.choice(k, l, replace=False) for _ in range(b)]).astype(np.int32)
    labels[::3, -1] = -1           # shorter label lists
    labels[1::4, 1:] = -1          # a single positive
    # Features near their first positive so positive cosines are large, as in training.
    features = centers[labels[:, 0]] + 0.7 * rng.normal(size=(b, d))
    return features.astype(dtype), centers.astype(dtype), labels
