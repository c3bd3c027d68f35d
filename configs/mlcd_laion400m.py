"""The preset `mlcd_laion400m` (mlcd_jax/config/presets/mlcd_laion400m.py), at the path the
docs give: `--config=configs/mlcd_laion400m.py` and `--config=mlcd_laion400m` load the same
config."""

from mlcd_jax.config.presets.mlcd_laion400m import get_config  # noqa: F401
