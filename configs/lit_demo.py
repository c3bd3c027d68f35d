"""The preset `lit_demo` (mlcd_jax/config/presets/lit_demo.py), at the path the docs give:
`--config=configs/lit_demo.py` and `--config=lit_demo` load the same config."""

from mlcd_jax.config.presets.lit_demo import get_config  # noqa: F401
