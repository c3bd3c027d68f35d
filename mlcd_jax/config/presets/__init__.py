"""The configs that ship with the package, by name, and the `--config` flag that loads them.

`--config=NAME[:ARG]` on any command, from any directory: a preset's `get_config(ARG)` (this
folder: demo, test_tiny, mlcd_laion400m:B/16, rice:B/16, lit_demo, …). `--config=PATH[:ARG]` is a
config file of one's own; `--config=configs/NAME.py` (the checkout's files, which load these) works
outside the checkout too. `--config.a.b=value` overrides a field; a field renamed since
(`schema.RENAMED`) keeps its old spelling.
"""

from __future__ import annotations

import os
import pathlib

from absl import flags

from mlcd_jax.runtime import cli
from mlcd_jax.runtime.errors import UserError

HERE = pathlib.Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def path(name: str) -> pathlib.Path:
    """The file of preset `name` (its `get_config(arg)` makes the config)."""
    return HERE / f"{name}.py"


def config_flag(flag_values: flags.FlagValues,
                help_text: str = "The config: a preset's name (e.g. demo, mlcd_laion400m:B/16, "
                "test_tiny) or a config file (configs/*.py[:ARG])."):
    """`--config`: an ml_collections config file's `get_config(ARG)`, overridable field by field
    with `--config.a.b=value`; a preset by its name."""
    from ml_collections import config_flags
    # ml_collections reads the --config.* overrides from `sys_argv` when the flag is parsed: the
    # arguments as rewritten here (an old field name under its new one), not the process's.
    argv: list[str] = []
    holder = config_flags.DEFINE_config_file("config", None, help_text, flag_values=flag_values,
                                             sys_argv=argv)

    def rewrite(given: list[str]) -> list[str]:
        argv[:] = [_rewrite(arg) for arg in given]
        return argv

    cli.rewrite_argv(flag_values, rewrite)
    return holder


def check_arg(arg, allowed: tuple, config_file: str) -> None:
    """A config file's `get_config(arg)` refuses an argument it does not know (a typo such as
    `:mlcdd` must not train something else)."""
    if arg not in allowed:
        shown = ", ".join(f":{a}" for a in allowed if a) or "none"
        raise UserError(f"--config={config_file}:{arg}: unknown config argument; allowed: {shown}")


def _rewrite(arg: str) -> str:
    """`--config=NAME` to its preset's file; a renamed field's old spelling to its new name."""
    from mlcd_jax.config import schema
    if arg.startswith("--config="):
        return "--config=" + _file(arg.split("=", 1)[1])
    for section, old, new in schema.RENAMED:
        if arg.split("=", 1)[0] == f"--config.{section}.{old}":
            return f"--config.{section}.{new}" + arg[len(f"--config.{section}.{old}"):]
    return arg


def _file(value: str) -> str:
    """A config file from `--config`: PATH[:ARG] as given where PATH is a file here, else the
    preset of that name (NAME, or configs/NAME.py from outside the checkout)."""
    given, colon, arg = value.partition(":")
    if os.path.isfile(given):
        return value
    name = given.removesuffix(".py").rsplit("/", 1)[-1]
    if (given == name or given.endswith(f"configs/{name}.py")) and name in names():
        return f"{path(name)}{colon}{arg}"
    raise UserError(f"--config={value}: no such config file or preset; the presets: "
                    f"{', '.join(names())} (e.g. --config=demo or --config=mlcd_laion400m:B/16), "
                    "or a path to a config file")


def load(value: str, overrides=()):
    """The config `--config=value` with `overrides` (["--config.a.b=v", …]) gives a command, every
    field checked: a mistake is one line naming the field."""
    from mlcd_jax.config import schema
    flag_values = flags.FlagValues()
    holder = config_flag(flag_values)
    cli.parse(["load", f"--config={value}", *overrides], flag_values)
    config = schema.upgrade(holder.value)
    schema.check(config)
    return config
