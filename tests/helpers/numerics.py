"""Comparing two computations of the same math done in another order (scan vs unrolled, sharded vs
one device). Float reassociation differs between CPUs (AVX2 and AVX-512 sum in other orders), so
the absolute tolerance is a fraction of the magnitude compared, never a fixed number."""

import jax
import numpy as np


def assert_same_math(got, want, rtol=1e-5):
    """Every leaf of `got` equals `want` elementwise within `rtol` of its own value, plus `rtol`
    of the largest |value| in all of `want` (a gradient that is mathematically 0, such as that of
    a key bias under softmax, is float noise at the scale of the others)."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    scale = max(float(np.max(np.abs(np.asarray(w, np.float64)))) for w in want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   rtol=rtol, atol=rtol * scale)
