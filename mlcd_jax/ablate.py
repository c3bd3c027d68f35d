"""Ablations of MLCD's choices (the paper's Table 5) on your data or the bundled demo data
(`mlcd-ablate`):

    python -m mlcd_jax.ablate --config=demo:mlcd --workdir=runs/ablate \\
        --grid='data.num_labels=1,2,4,8' --grid='head.sample_ratio=0.1,0.3,1.0' --seeds=3

Each --grid is one swept config field, varied one at a time around the config's own values, as
the paper's ablations are (--product: every combination instead); every point is pretrained with
--seeds seeds, probed, and summarized as a table (mean ± std) and a PNG per field. A rerun skips
what finished. `--config.*` overrides apply to every run. The sweep: mlcd_jax/demos/ablation.py.
"""

import pathlib
import sys

from absl import flags

from mlcd_jax.config import presets
from mlcd_jax.runtime import cli

FLAGS = flags.FlagValues()
CONFIG = presets.config_flag(FLAGS, "A training config: a preset's name (demo:mlcd) or a file.")
WORKDIR = flags.DEFINE_string("workdir", None, "Label stores, runs, results, table and plots.",
                              flag_values=FLAGS)
GRID = flags.DEFINE_multi_string("grid", [], "FIELD=V1,V2,...: a config field and its values.",
                                 flag_values=FLAGS)
SEEDS = flags.DEFINE_integer("seeds", 3, "Pretrainings per point, config.seed = 0 .. seeds-1.",
                             flag_values=FLAGS)
PRODUCT = flags.DEFINE_boolean("product", False, "Every combination of the grids' values, "
                               "instead of one field at a time around the config's values.",
                               flag_values=FLAGS)
EMBEDDINGS = flags.DEFINE_string("embeddings", "", "Teacher embeddings of the training data "
                                 "(`labels embed`); default for digits_canvas: the demo's.",
                                 flag_values=FLAGS)


def command(argv: list[str]) -> int:
    """The sweep; `argv`: the command's arguments (its --config.* overrides go to every run)."""
    from ml_collections import config_flags

    from mlcd_jax.demos import ablation
    from mlcd_jax.runtime.errors import UserError
    # The trainer gets the same config (by its resolved path) and --config.* flags.
    overrides = [a for a in argv if a.startswith("--config.")]
    spaced = [a for a in overrides if "=" not in a]
    if spaced:
        raise UserError(f"{spaced[0]}: write it as {spaced[0]}=VALUE")
    path, colon, arg = config_flags.get_config_filename(FLAGS["config"]).partition(":")
    given = [f"--config={pathlib.Path(path).absolute()}{colon}{arg}", *overrides]
    return ablation.ablate(CONFIG.value, pathlib.Path(WORKDIR.value).absolute(), given,
                           grids=GRID.value, seeds=SEEDS.value, product=PRODUCT.value,
                           embeddings=EMBEDDINGS.value)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.run(lambda _: command(argv), FLAGS, argv, required=("config", "workdir"),
                   doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
