"""python -m mlcd_jax.demo: the bundled demos (`mlcd_jax/demos/`)."""

import sys

from mlcd_jax.demos import mlcd

if __name__ == "__main__":
    sys.exit(mlcd.main())
