"""LiT: a text tower trained against a locked encoder, for zero-shot and retrieval. `python -m
mlcd_jax.lit`."""
