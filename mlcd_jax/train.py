"""MLCD pretraining of a vision encoder (`mlcd-train`):

    python -m mlcd_jax.train --config=test_tiny --workdir=/tmp/tiny
    python -m mlcd_jax.train --config=mlcd_laion400m:B/16 --workdir=RUN \\
        --config.data.path='data/train-*.array_record' --config.data.labels=LAB
    python -m mlcd_jax.train --config=configs/demo.py:mlcd --workdir=RUN --config.total_steps=100

Resumes from the workdir's newest good checkpoint; SIGTERM saves at the next step and exits
(rerun to resume exactly). `--compile_only` compiles the step and prints its per-device memory,
with no data and nothing allocated. The trainer: mlcd_jax/training/trainer.py.
"""

import sys

from absl import flags

from mlcd_jax.config import presets
from mlcd_jax.runtime import cli

FLAGS = flags.FlagValues()
CONFIG = presets.config_flag(FLAGS)
WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config.",
                              flag_values=FLAGS)
COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train step, print its "
                                 "per-device memory, and exit: no data, no parameters allocated.",
                                 flag_values=FLAGS)
MULTIHOST = cli.multihost_flags(FLAGS)

if __name__ == "__mp_main__":  # a worker process of this command (grain's input workers are
    cli.start()                # spawned): jax starts there as in the command, quietly


def command(args) -> None:
    del args
    from ml_collections import config_flags

    from mlcd_jax.training import trainer
    explicit = set(config_flags.get_override_values(FLAGS["config"]))
    trainer.run(CONFIG.value, WORKDIR.value, explicit=explicit, compile_only=COMPILE_ONLY.value,
                multihost=MULTIHOST.values())


def main(argv=None) -> int:
    return cli.run(command, FLAGS, argv, required=("config", "workdir"), doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
