"""The preset `demo_regions` (mlcd_jax/config/presets/demo_regions.py), at the path the docs give:
`--config=configs/demo_regions.py` and `--config=demo_regions` load the same config."""

from mlcd_jax.config.presets.demo_regions import get_config  # noqa: F401
