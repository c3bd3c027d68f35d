"""Frozen-feature evaluation: linear probe and kNN, zero-shot and retrieval, region and dense
probes, train/test splits that never test on train images. `python -m mlcd_jax.evaluate`."""
