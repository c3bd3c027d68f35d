"""The preset `demo` (mlcd_jax/config/presets/demo.py), at the path the docs give:
`--config=configs/demo.py` and `--config=demo` load the same config."""

from mlcd_jax.config.presets.demo import get_config  # noqa: F401
