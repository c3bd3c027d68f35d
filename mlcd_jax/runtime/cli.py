"""Every command's command line, one stack: absl flags, `--help`, configs by name or path, one-line
errors and exit codes.

A command (`python -m mlcd_jax.train`, a `__main__` module, a console script `mlcd-train`) defines
its flags with absl at import, in a FlagValues of its own (two commands imported into one process
never collide), and imports the rest of the package inside its body, which `run` calls once the
backend is chosen:

    FLAGS = flags.FlagValues()
    CONFIG = presets.config_flag(FLAGS)
    WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, the resolved config.",
                                  flag_values=FLAGS)

    def command(args):
        from mlcd_jax.training import trainer   # jax starts here, on the backend chosen
        trainer.run(CONFIG.value, WORKDIR.value)

    def main(argv=None) -> int:                 # the console script's entry, too
        return cli.run(command, FLAGS, argv, required=("config", "workdir"), doc=__doc__)

    if __name__ == "__main__":
        sys.exit(main())

`run` (1) chooses the backend before jax starts (`backend.choose`: importing the package chooses
nothing), (2) parses the flags: `--help` prints the command's docstring and flags; a mistake (an
unknown flag, a value of the wrong type, a misspelt config field, a config file or argument that
does not exist) is one line and exit 2; argparse's `--no-FLAG` still means `--noFLAG`; a flag may
rewrite its arguments first (`rewrite_argv`: `--config=NAME` names a preset, config/presets/), and
(3) calls
the body: a `UserError` ends in its one line and exit code (2; a diverged run 3), as does a full
disk or a file the user may not write; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import re
import sys
import weakref
from collections.abc import Callable, Sequence

from absl import flags

from mlcd_jax.runtime.errors import UserError  # noqa: F401  (commands raise cli.UserError)

# OS errors that are the machine's state, not the code's: said in one line naming the file.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


def rewrite_argv(flag_values: flags.FlagValues,
                 rewrite: Callable[[list[str]], list[str]]) -> None:
    """Have `parse` pass the arguments through `rewrite` before absl reads them: how a flag that
    needs more than absl's parsing takes part (config/presets.py: `--config=NAME` to the preset's
    file, renamed config fields to their new names)."""
    _REWRITES.setdefault(flag_values, []).append(rewrite)


_REWRITES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Multihost:
    """A multi-process job's flags (auto-detected on TPU pods, SLURM and Open MPI; else these, or
    the JAX_* variables `launch/local_multiprocess.sh` sets; runtime/distributed.py)."""
    coordinator_address: flags.FlagHolder
    num_processes: flags.FlagHolder
    process_id: flags.FlagHolder

    def values(self) -> tuple[str | None, int | None, int | None]:
        return (self.coordinator_address.value, self.num_processes.value,
                self.process_id.value)


def multihost_flags(flag_values: flags.FlagValues) -> Multihost:
    return Multihost(
        flags.DEFINE_string("coordinator_address", None, "host:port of process 0.",
                            flag_values=flag_values),
        flags.DEFINE_integer("num_processes", None, "Processes in the job.",
                             flag_values=flag_values),
        flags.DEFINE_integer("process_id", None, "This process's index.",
                             flag_values=flag_values))


@dataclasses.dataclass(frozen=True)
class Sizing:
    """How a command feeds an encoder images (`interop.weights.sizing` takes these; empty or 0: as
    the model was trained or exported, square crops for other models)."""
    resolution: flags.FlagHolder
    max_tokens: flags.FlagHolder
    min_tokens: flags.FlagHolder


def sizing_flags(flag_values: flags.FlagValues) -> Sizing:
    return Sizing(
        flags.DEFINE_enum(
            "resolution", "", ["", "square", "native", "squash"], "square: image_size² crops; "
            "squash: each whole image resized to image_size²; native: each image at its aspect "
            "ratio within --max_tokens patches (default: as the model was trained or exported; "
            "square for other models).", flag_values=flag_values),
        flags.DEFINE_integer("max_tokens", 0, "native: patches per image at most (default: the "
                             "model's budget, else (image_size / patch)²).",
                             flag_values=flag_values),
        flags.DEFINE_integer("min_tokens", 0, "native: images keep their own size where it has "
                             "min_tokens … max_tokens patches (default: the model's).",
                             flag_values=flag_values))


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One verb of a command with several (`labels embed …`): its own flags and body."""
    command: Callable[[list[str]], int | None]
    flag_values: flags.FlagValues
    help: str
    required: tuple[str, ...] = ()


def run(command: Callable[[list[str]], int | None], flag_values: flags.FlagValues,
        argv: Sequence[str] | None = None, *, required: Sequence[str] = (), doc: str = "",
        prog: str = "") -> int:
    """Run a command: the backend chosen, its flags parsed from `argv` (the arguments after the
    program's name; default: this process's), `command(positional args)` called. Returns the
    exit status (see the module's docstring)."""
    argv = [prog or sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    if _wants_help(argv):
        print(_help(doc, flag_values))
        return 0
    start()
    return _call(lambda: command(parse(argv, flag_values, required)))


def run_subcommands(commands: dict[str, Subcommand], argv: Sequence[str] | None = None, *,
                    doc: str = "") -> int:
    """Run `PROG VERB --flags ...`: the verb's own flags parsed, its command called; the exit
    status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = "\n".join(f"  {name:<10}{c.help}" for name, c in commands.items())
    verb = argv[0] if argv else ""
    if verb in ("", "-h", "--help", "help"):
        print(f"{doc.strip()}\n\ncommands (each VERB --help lists its flags):\n{verbs}")
        return 0 if verb else 2
    if verb not in commands:
        return _say(f"unknown command {verb!r}; one of: {', '.join(commands)}", 2)
    subcommand = commands[verb]
    rest = [f"{sys.argv[0]} {verb}", *argv[1:]]
    if _wants_help(rest):
        print(_help(subcommand.help, subcommand.flag_values))
        return 0
    start()
    return _call(lambda: subcommand.command(parse(rest, subcommand.flag_values,
                                                  subcommand.required)))


def parse(argv: Sequence[str], flag_values: flags.FlagValues,
          required: Sequence[str] = ()) -> list[str]:
    """The positional arguments of `argv` once `flag_values` are parsed from it; a mistake raises
    UserError with one line naming the flag or config field."""
    argv = _normalize(list(argv), flag_values)
    flag_values.unparse_flags()  # a second run in one process starts from the defaults
    try:
        positional = flag_values(argv)
    except flags.Error as e:  # a config file's own error arrives with its traceback as text
        lines = [line for line in str(e).splitlines() if line.strip()]
        last = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
        raise UserError(last if "Traceback" in str(e) else " ".join(lines)) from None
    except (AttributeError, KeyError) as e:  # a config field that does not exist
        text = repr(e.args)
        name = re.search(r"'+(\w+)\\*'", text)
        hint = re.search(r'Did you mean \\*"(\w+)\\*"', text)
        arg = next((a.split("=")[0] for a in argv if name and a.startswith("--config.")
                    and a.split("=")[0].endswith("." + name.group(1))), "--config")
        raise UserError(f"{arg}: config has no field {name.group(1) if name else text!r}"
                        f"{f'; did you mean {hint.group(1)!r}?' if hint else ''} (every field "
                        "and its default: mlcd_jax/config/schema.py)") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(" ".join(str(e).split())) from None
    for name in required:
        if flag_values[name].value is None:
            raise UserError(f"--{name} is required: {flag_values[name].help}")
    return positional


# Where this package is imported from: the commands a command starts find it there too, from a
# checkout that was never installed as well as from a wheel.
PACKAGE_PARENT = str(pathlib.Path(__file__).resolve().parents[2])


def command_env(devices: int = 8) -> dict:
    """The environment of a command this one starts (`python -m mlcd_jax.…`): this process's,
    with `devices` simulated CPU devices added to its XLA_FLAGS (a user's own XLA flags kept; a
    GPU or TPU is used as it is) and this package importable."""
    xla = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla:
        xla = f"{xla} --xla_force_host_platform_device_count={devices}".strip()
    path = os.environ.get("PYTHONPATH", "")
    return os.environ | {"XLA_FLAGS": xla,
                         "PYTHONPATH": os.pathsep.join(filter(None, (path, PACKAGE_PARENT)))}


def start() -> None:
    """What every command does first: the backend chosen before jax starts
    (`backend.choose`), absl's global flags (the libraries') at their defaults."""
    from mlcd_jax.runtime import backend
    backend.choose()
    # Libraries read absl's global flags (grain's workers do, and fail while they are unparsed):
    # at their defaults; a command's own flags are its FlagValues'.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# -- inside -------------------------------------------------------------------------------------


def _call(body: Callable[[], int | None]) -> int:
    """`body()`'s exit status; a user's mistake (or the machine's: a full disk) is one line."""
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
    try:
        return body() or 0
    except UserError as e:
        return _say(str(e), e.exit_code)
    except OSError as e:
        if e.errno not in MACHINE_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        return _say(f"{e.strerror or e}{where} (free space or permissions there, then rerun: "
                    "finished work is kept)", 2)


def _say(message: str, status: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return status


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv[1:])


def _help(doc: str | None, flag_values: flags.FlagValues) -> str:
    """The command's docstring, then each of its flags (absl's own logging flags left out)."""
    import textwrap
    lines, seen = [], set()
    for module, found in flag_values.flags_by_module_dict().items():
        for flag in found:
            if module.startswith("absl.") or flag.name in seen:
                continue
            seen.add(flag.name)
            name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
            default = (f" (default: {flag.default_as_str})"
                       if flag.default not in (None, "", [], ()) else "")
            lines += textwrap.wrap(f"{name}: {flag.help}{default}", 98,
                                   initial_indent="  ", subsequent_indent="      ")
    return f"{(doc or '').strip()}\n\nflags:\n" + "\n".join(lines)


def _normalize(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
    """argparse's spellings the commands had (`--no-FLAG`, `--flag value` for a flag with a
    rewrite) in absl's, each argument through the flags' rewrites (`rewrite_argv`)."""
    rewrites = _REWRITES.get(flag_values, [])
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--no-") and arg[5:].replace("-", "_") in flag_values:
            arg = "--no" + arg[5:].replace("-", "_")
        if rewrites and i + 1 < len(argv) and arg.startswith("--") and "=" not in arg \
                and arg[2:] in flag_values and not flag_values[arg[2:]].boolean:
            arg, i = f"{arg}={argv[i + 1]}", i + 1  # one argument for the rewrites to see
        out.append(arg)
        i += 1
    for rewrite in rewrites:
        out = rewrite(out)
    return out
