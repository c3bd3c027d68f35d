"""The preset `demo_native` (mlcd_jax/config/presets/demo_native.py), at the path the docs give:
`--config=configs/demo_native.py` and `--config=demo_native` load the same config."""

from mlcd_jax.config.presets.demo_native import get_config  # noqa: F401
