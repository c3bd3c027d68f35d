"""The preset `rice` (mlcd_jax/config/presets/rice.py), at the path the docs give:
`--config=configs/rice.py` and `--config=rice` load the same config."""

from mlcd_jax.config.presets.rice import get_config  # noqa: F401
