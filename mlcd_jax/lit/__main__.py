"""LiT: a text tower trained against a locked image encoder, for zero-shot classification and
image–text retrieval (`mlcd-lit`):

    python -m mlcd_jax.lit --config=lit_demo --workdir=DIR --config.image.model=RUN
    python -m mlcd_jax.lit --config=lit --workdir=DIR --config.image.model=RUN \\
        --config.data.path=TRAIN_IMAGES --config.data.test_path=TEST_IMAGES

Resumes from the workdir's newest good checkpoint; at the end the text tower is written as a
transformers CLIPTextModelWithProjection (WORKDIR/text_model). The trainer: trainer.py here.
"""

import sys

from absl import flags

from mlcd_jax.config import presets
from mlcd_jax.runtime import cli

FLAGS = flags.FlagValues()
CONFIG = presets.config_flag(FLAGS, "The config: a preset's name (lit, lit_demo, lit:siglip) or "
                             "a file (configs/lit*.py[:ARG]).")
WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, features, tokenizer.",
                              flag_values=FLAGS)
MULTIHOST = cli.multihost_flags(FLAGS)


def command(args) -> None:
    del args
    from mlcd_jax.lit import trainer
    trainer.run(CONFIG.value, WORKDIR.value, multihost=MULTIHOST.values())


def main(argv=None) -> int:
    return cli.run(command, FLAGS, argv, required=("config", "workdir"), doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
