"""transformers' MLCD / CLIP vision and CLIP text models, weights in and out: the mapping in
`mapping.py`, its command line in `__main__.py` (`python -m mlcd_jax.interop.hf`)."""
