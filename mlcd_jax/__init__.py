"""mlcd_jax: Multi-label Cluster Discrimination pretraining of vision encoders in JAX/Flax.

Importing the package first chooses the platform jax will use and starts jax quietly
(`mlcd_jax.runtime.backend.choose`): every `python -m mlcd_jax.<module>` runs this before its module
imports jax.
"""

from mlcd_jax.runtime import backend as _platform

_platform.choose()
