"""python -m mlcd_jax.interop {import,export} SRC DST: the same command as
python -m mlcd_jax.interop.hf."""

import sys

from mlcd_jax.interop.hf.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
