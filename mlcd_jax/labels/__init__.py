"""Cluster labels: embed (the one embedding loop) → k-means → assign → the label store; joins of
records and rows by key; OCR labels; the jax backend on the device mesh; stats. `python -m
mlcd_jax.labels`."""
