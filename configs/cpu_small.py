"""The preset `cpu_small` (mlcd_jax/config/presets/cpu_small.py), at the path the docs give:
`--config=configs/cpu_small.py` and `--config=cpu_small` load the same config."""

from mlcd_jax.config.presets.cpu_small import get_config  # noqa: F401
