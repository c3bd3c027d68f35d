"""mlcd_jax: Multi-label Cluster Discrimination pretraining of vision encoders in JAX/Flax.

Importing the package (or any module of it) changes nothing: no environment variable, no backend.
Each command chooses the platform at the start of its `main` (`mlcd_jax/runtime/cli.py`).
"""
