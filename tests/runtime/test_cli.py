"""The one command line (mlcd_jax/runtime/cli.py) and the package's imports: a user's mistake is one
line and exit 2, a bug keeps its traceback, and importing the package changes nothing."""

import os
import subprocess
import sys

import pytest

from mlcd_jax.config import presets
from mlcd_jax.runtime import backend, cli
from mlcd_jax.runtime.errors import UserError

from helpers.commands import REPO


def python(code: str, *, env: dict | None = None, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=os.environ | (env or {}), timeout=300)


def command(raises: str) -> str:
    """A command whose main raises `raises` (an expression)."""
    return ("import errno, sys\n"
            "from absl import flags\n"
            "from mlcd_jax.runtime import cli\n"
            "from mlcd_jax.runtime.errors import UserError, Diverged\n"
            f"def command(args):\n    raise {raises}\n"
            "sys.exit(cli.run(command, flags.FlagValues(), []))\n")


def test_a_user_error_is_one_line_and_exit_2():
    done = python(command('UserError("config.head.loss: must be one of (...), got \'x\'")'))
    assert done.returncode == 2
    assert done.stderr == "error: config.head.loss: must be one of (...), got 'x'\n"


def test_a_diverged_run_exits_3():
    done = python(command('Diverged("the loss is nan at step 7")'))
    assert (done.returncode, done.stderr) == (3, "error: the loss is nan at step 7\n")


def test_a_full_disk_is_one_line_naming_the_file():
    done = python(command('OSError(errno.ENOSPC, "No space left on device", "/data/run/x.npy")'))
    assert done.returncode == 2
    assert done.stderr.startswith("error: No space left on device: /data/run/x.npy (free space")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("raises", ['ValueError("shapes (3, 4) and (5,) do not broadcast")',
                                    'KeyError("params")',
                                    'OSError(errno.EIO, "Input/output error")'])
def test_anything_else_is_a_bug_and_keeps_its_traceback(raises):
    done = python(command(raises))
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert not done.stderr.startswith("error:")


def test_an_internal_error_inside_a_real_command_keeps_its_traceback(tmp_path):
    """A shape bug injected into the trainer's step build reaches the user as a traceback, not
    as a one-line 'error:' that would look like a typo."""
    code = ("import runpy, sys\n"
            "from mlcd_jax.runtime import backend\n"
            "backend.choose()\n"
            "from mlcd_jax.training import step\n"
            "def broken(*args, **kwargs):\n"
            "    raise ValueError('dot_general requires contracting dimensions to have the same "
            "shape, got (32,) and (64,)')\n"
            "step.build = broken\n"
            f"sys.argv = ['train', '--config=test_tiny', '--workdir={tmp_path}']\n"
            "runpy.run_module('mlcd_jax.train', run_name='__main__', alter_sys=True)\n")
    done = python(code, env={"JAX_PLATFORMS": "cpu"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr
    assert "in broken" in done.stderr and "contracting dimensions" in done.stderr


def test_a_mistake_in_a_real_command_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlcd_jax.labels", "kmeans", "--embeddings",
                           str(tmp_path / "none"), "--out", str(tmp_path / "lab"),
                           "--num_centers", "3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {tmp_path / 'none'}: no manifest.json")
    assert len(done.stderr.splitlines()) == 1


def test_flags_and_config_mistakes_are_one_line(tmp_path):
    for args, says in (
            (["--config=test_tiny", f"--workdir={tmp_path}", "--config.head.lossy=mlcd"],
             "--config.head.lossy: config has no field 'lossy'"),
            (["--config=test_tiny:nope", f"--workdir={tmp_path}"], "unknown config argument"),
            (["--config=no_such_preset", f"--workdir={tmp_path}"],
             "--config=no_such_preset: no such config file or preset; the presets: cpu_small, "
             "demo"),
            (["--config=test_tiny"], "--workdir is required"),
            (["--config=test_tiny", f"--workdir={tmp_path}", "--bogus=1"],
             "Unknown command line flag 'bogus'")):
        done = subprocess.run([sys.executable, "-m", "mlcd_jax.train", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert done.stderr.startswith("error: ") and says in done.stderr, (args, done.stderr)
        assert len(done.stderr.splitlines()) == 1, done.stderr


def test_help_shows_the_commands_doc_and_its_flags(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlcd_jax.train", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert done.stdout.startswith("MLCD pretraining of a vision encoder")
    for flag in ("--config:", "--workdir:", "--[no]compile_only:", "--coordinator_address:"):
        assert flag in done.stdout
    assert "--logtostderr" not in done.stdout  # absl's own flags left out


def test_argparse_spellings_and_presets_by_name():
    from absl import flags
    fv = flags.FlagValues()
    flags.DEFINE_bool("pixels", True, "", flag_values=fv)
    flags.DEFINE_string("model", None, "", flag_values=fv)
    flags.DEFINE_alias("checkpoint", "model", flag_values=fv)
    presets.config_flag(fv)
    rest = cli.parse(["prog", "--no-pixels", "--checkpoint", "RUN", "--config", "test_tiny:unicom",
                      "--config.evals.dataset=digits", "pos"], fv, required=("model",))
    assert rest == ["prog", "pos"]
    assert fv.pixels is False and fv.model == "RUN"
    assert fv.config.head.loss == "unicom"  # the preset, by name, from any directory
    assert fv.config.evals.source == "digits"  # a renamed field under its old name
    with pytest.raises(UserError, match="--model is required"):
        fresh = flags.FlagValues()
        flags.DEFINE_string("model", None, "a model", flag_values=fresh)
        cli.parse(["prog"], fresh, required=("model",))


def test_importing_the_package_changes_nothing():
    """`import mlcd_jax` sets no variable and loads no jax; no module of it changes the
    environment when imported. (Some libraries do, on their own import: jax with libtpu installed
    sets TPU_LIBRARY_PATH, scikit-learn KMP_* variables; they are imported first, so what is
    checked is the package's own code.)"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("import os, sys, pkgutil, importlib\n"
            "e = dict(os.environ)\n"
            "import mlcd_jax\n"
            "assert dict(os.environ) == e, 'import mlcd_jax changed the environment'\n"
            "assert 'jax' not in sys.modules, 'import mlcd_jax imported jax'\n"
            "import jax, flax, optax, orbax.checkpoint, grain, faiss, sklearn.linear_model\n"
            "import tensorflow_datasets, pyarrow.parquet, matplotlib\n"
            "e = dict(os.environ)\n"
            "names = [m.name for m in pkgutil.walk_packages(mlcd_jax.__path__, 'mlcd_jax.')]\n"
            "assert len(names) > 60, names\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "    changed = {k for k in e.keys() | os.environ.keys() if e.get(k) != "
            "os.environ.get(k)}\n"
            "    assert not changed, f'import {name} changed {changed}'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_commands_import_no_jax_before_choosing_the_backend():
    """Each command module imports only what defines its flags: jax starts in `cli.run`, after
    the backend is chosen (quietly, where the CUDA plugin is installed without a GPU)."""
    commands = ("mlcd_jax.train", "mlcd_jax.plan", "mlcd_jax.demo", "mlcd_jax.ablate",
                "mlcd_jax.lit.__main__", "mlcd_jax.labels.__main__", "mlcd_jax.evaluate.__main__",
                "mlcd_jax.interop.hf.__main__", "mlcd_jax.interop.__main__",
                "mlcd_jax.data.convert")
    code = ("import importlib, sys\n"
            f"for name in {commands!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'jax' not in sys.modules, f'{name} imports jax'\n")
    done = python(code)
    assert done.returncode == 0, done.stderr[-3000:]


def test_jax_private_plugin_registration_is_still_there():
    """`backend.register_plugins` is the package's one use of jax's private API: this fails when
    jax renames or removes it (then find jax's public way to register plugins early)."""
    from jax._src import xla_bridge
    assert callable(getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None))
    backend.register_plugins()
    assert xla_bridge._plugins_registered
