"""Capacity planning without the hardware (`mlcd-plan`): the trainer's own train step compiled
ahead of time for a TPU topology or a GPU cluster, on this machine's CPU.

    python -m mlcd_jax.plan --config=mlcd_laion400m:L/14 --topology=v5p:4x4x4
    python -m mlcd_jax.plan --config=mlcd_laion400m:B/16 --topology=h200:8 --json=p.json
    python -m mlcd_jax.plan --config=mlcd_laion400m:B/16 --topology=h100:2x8 \\
        --config.mesh="(('data', 16),)"

Prints per-device memory against the device's, model FLOPs, images/s and days at an assumed MFU,
which knob helps when the recipe does not fit, and what the compiled program is (kernels,
collectives, the largest temporaries, a roofline estimate): mlcd_jax/planning/plan.py. Needs
libtpu for TPUs and jax's CUDA plugin (with cuDNN) for GPUs, matching the installed jax:
`make plan-env`.
"""

import json
import os
import pathlib
import sys

from absl import flags

from mlcd_jax.config import presets
from mlcd_jax.runtime import cli

FLAGS = flags.FlagValues()
CONFIG = presets.config_flag(FLAGS, "The config, as the trainer's: a preset's name "
                             "(mlcd_laion400m:B/16, rice:B/16) or a file (configs/*.py[:ARG]).")
TOPOLOGY = flags.DEFINE_string(
    "topology", None, "A TPU topology name libtpu accepts (v5e:4x4, v5p:4x4x4, v4:4x4x4, "
    "v6e:8x8) or GPUs: NAME:N or NAME:HOSTSxN with NAME one of h100, h200, b200, a100-80g.",
                               flag_values=FLAGS)
JSON = flags.DEFINE_string("json", None, "Also write the plan to this JSON file.",
                           flag_values=FLAGS)
MFU = flags.DEFINE_float("mfu", 0.5, "Assumed model FLOPs utilisation for images/s and days.",
                         flag_values=FLAGS)


def command(args) -> None:
    del args
    import jax
    from absl import logging
    from ml_collections import config_flags

    from mlcd_jax.interop import weights
    from mlcd_jax.planning import plan
    logging.set_verbosity(logging.ERROR)
    # The compilers run on this CPU: jax itself needs no accelerator backend (and must not start
    # the CUDA plugin's, which fails without a driver) unless the user asked for one.
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    c = CONFIG.value
    if c.model.init_from:  # the architecture of the encoder the run would continue from
        explicit = set(config_flags.get_override_values(FLAGS["config"]))
        print(f"encoder: {weights.adopt_architecture(c, explicit)}", flush=True)
    result = plan.plan(c, TOPOLOGY.value, MFU.value)
    print(plan.show(result), flush=True)
    if JSON.value:
        pathlib.Path(JSON.value).write_text(json.dumps(result, indent=2))
        print(f"wrote {JSON.value}")


def main(argv=None) -> int:
    return cli.run(command, FLAGS, argv, required=("config", "topology"), doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
