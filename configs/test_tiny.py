"""The preset `test_tiny` (mlcd_jax/config/presets/test_tiny.py), at the path the docs give:
`--config=configs/test_tiny.py` and `--config=test_tiny` load the same config."""

from mlcd_jax.config.presets.test_tiny import get_config  # noqa: F401
