"""Command-line parsing for the absl commands (the trainer, LiT, the planner) in which a config
mistake is one line naming it, the config files' own argument check, and the sizing flags of the
argparse commands that feed an encoder images (evaluate, labels embed)."""

from __future__ import annotations

import os
import re


def parse_flags(argv):
    """absl flag parsing for the trainer and the planner in which a config mistake (a misspelt
    field, a missing config file, a value of the wrong type, an unknown config argument) is one
    line naming it, and exit 2, instead of ml_collections' chained tracebacks."""

    from absl import flags
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                _exit(f"--config={path}: no such file (configs are in configs/, e.g. "
                      "--config=configs/test_tiny.py)")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a config file's own error arrives with its traceback as text
        lines = [l for l in str(e).splitlines() if l.strip()]
        _exit(re.sub(r"^\w+(Error|Exception): ", "", lines[-1]) if "Traceback" in str(e)
              else " ".join(lines))
    except (AttributeError, KeyError) as e:  # a field that does not exist
        text = repr(e.args)
        name = re.search(r"'+(\w+)\\*'", text)
        hint = re.search(r'Did you mean \\*"(\w+)\\*"', text)
        arg = next((a.split("=")[0] for a in argv if name and a.startswith("--config.")
                    and a.split("=")[0].endswith("." + name.group(1))), "--config")
        _exit(f"{arg}: config has no field {name.group(1) if name else text!r}"
              f"{f'; did you mean {hint.group(1)!r}?' if hint else ''} (every field and its "
              "default: mlcd_jax/config/schema.py:base_config)")
    except (OSError, ValueError, TypeError) as e:
        _exit(" ".join(str(e).split()))


def _exit(message: str):
    import sys
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_arg(arg, allowed: tuple, config_file: str) -> None:
    """A config file's `get_config(arg)` refuses an argument it does not know (a typo such as
    `:mlcdd` must not train something else)."""
    if arg not in allowed:
        shown = ", ".join(f":{a}" for a in allowed if a) or "none"
        raise ValueError(f"--config={config_file}:{arg}: unknown config argument; allowed: {shown}")


SHAPE_FIELDS = ("width", "depth", "heads", "mlp_dim", "patch")  # model.size, field by field


def add_sizing_flags(parser) -> None:
    """--resolution, --max_tokens, --min_tokens: how a command feeds an encoder (`weights.sizing`
    takes them; empty or 0: as the model was trained or exported, square crops for other models)."""
    parser.add_argument("--resolution", default="", choices=("", "square", "native", "squash"),
                        help="square: image_size² crops; squash: each whole image resized to "
                        "image_size²; native: each image at its aspect ratio within --max_tokens "
                        "patches (default: as the model was trained or exported; square for "
                        "other models)")
    parser.add_argument("--max_tokens", type=int, default=0, help="native: patches per image at "
                        "most (default: the model's budget, else (image_size / patch)²)")
    parser.add_argument("--min_tokens", type=int, default=0, help="native: images keep their own "
                        "size where it has min_tokens … max_tokens patches (default: the "
                        "model's)")
