"""The preset `lit` (mlcd_jax/config/presets/lit.py), at the path the docs give:
`--config=configs/lit.py` and `--config=lit` load the same config."""

from mlcd_jax.config.presets.lit import get_config  # noqa: F401
