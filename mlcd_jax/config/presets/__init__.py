"""The configs that ship with the package, by name: `--config=NAME[:ARG]` on any command, or
`--config=configs/NAME.py[:ARG]` in a checkout (those files load these)."""

from __future__ import annotations

import pathlib

HERE = pathlib.Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def path(name: str) -> pathlib.Path:
    """The file of preset `name` (its `get_config(arg)` makes the config)."""
    return HERE / f"{name}.py"
