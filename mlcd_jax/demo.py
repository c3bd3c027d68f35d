"""MLCD end to end on bundled data, no download (`mlcd-demo`; `make demo`):

    python -m mlcd_jax.demo [--workdir=runs/demo]
    python -m mlcd_jax.demo --regions [--seeds=3]     # RICE's region heads (runs/demo_regions)
    python -m mlcd_jax.demo --native [--seeds=3]      # native resolution (runs/demo_native)

scikit-learn's handwritten digits on 32 × 32 canvases: teacher embeddings → k-means → top-l
labels → MLCD and single-label pretraining on 8 simulated CPU devices → linear probe and kNN →
LiT (zero-shot, retrieval). Writes results.json, a table and PNG curves to the workdir. The
demos: mlcd_jax/demos/ (mlcd.py, regions.py, native.py).
"""

import sys

from absl import flags

from mlcd_jax.runtime import cli

FLAGS = flags.FlagValues()
WORKDIR = flags.DEFINE_string("workdir", "", "Where everything is written (default: runs/demo, "
                              "runs/demo_regions with --regions, runs/demo_native with --native).",
                              flag_values=FLAGS)
OVERRIDE = flags.DEFINE_multi_string("override", [], "A trainer flag for every pretraining, e.g. "
                                     "--override=--config.head.margin_type=cosface",
                                     flag_values=FLAGS)
LIT_OVERRIDE = flags.DEFINE_multi_string("lit_override", [], "A flag for the LiT runs, e.g. "
                                         "--lit_override=--config.total_steps=100",
                                         flag_values=FLAGS)
REGIONS = flags.DEFINE_bool("regions", False, "The region demo instead (RICE, demos/regions.py): "
                            "image-only MLCD vs + object regions vs + OCR regions on "
                            "digits_regions, --seeds seeds each.", flag_values=FLAGS)
NATIVE = flags.DEFINE_bool("native", False, "The native-resolution demo instead "
                           "(demos/native.py): square crops vs squash vs native resolution at "
                           "the same token budget on digits_strips, --seeds seeds each.",
                           flag_values=FLAGS)
SEEDS = flags.DEFINE_integer("seeds", 3, "With --regions or --native: seeds per run.",
                             lower_bound=1, flag_values=FLAGS)
MAX_PATCHES = flags.DEFINE_integer("max_patches", 5000, "With --regions: the dense probe's "
                                   "patches per split (a seeded sample).", lower_bound=2,
                                   flag_values=FLAGS)


def command(args) -> None:
    del args
    if NATIVE.value:
        from mlcd_jax.demos import native
        native.run(WORKDIR.value or "runs/demo_native", seeds=SEEDS.value,
                   overrides=OVERRIDE.value)
    elif REGIONS.value:
        from mlcd_jax.demos import regions
        regions.run(WORKDIR.value or "runs/demo_regions", seeds=SEEDS.value,
                    overrides=OVERRIDE.value, max_patches=MAX_PATCHES.value)
    else:
        from mlcd_jax.demos import mlcd
        mlcd.run(WORKDIR.value or "runs/demo", overrides=OVERRIDE.value,
                 lit_overrides=LIT_OVERRIDE.value)


def main(argv=None) -> int:
    return cli.run(command, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
