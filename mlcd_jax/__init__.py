"""mlcd_jax: Multi-label Cluster Discrimination pretraining of vision encoders in JAX/Flax.

Importing the package first chooses the platform jax will use and starts jax quietly
(`mlcd_jax.platform.choose`): every `python -m mlcd_jax.<module>` runs this before its module
imports jax.
"""

from mlcd_jax import platform as _platform

_platform.choose()
