"""The tests' way of running commands (tests/commands.py): a command forked from the command server
behaves as `python -m` started afresh: the same exit status, stdout and stderr, its own process
(signals, devices), and a command that outlives its timeout is killed."""

import subprocess

import pytest

from helpers import commands


@pytest.mark.slow
def test_a_forked_command_is_the_command_started_afresh(tmp_path):
    mistake = ("mlcd_jax.train", "--config=configs/test_tiny.py", f"--workdir={tmp_path}",
               "--config.data.source=folder")
    forked = commands.run(*mistake, expect=None)
    environ = commands.env(compile=commands.compile_for(mistake[0]))  # the forked command's
    assert commands._server.serves(environ)  # it went through the server
    afresh = subprocess.run(commands.command(*mistake), cwd=commands.REPO, env=environ,
                            capture_output=True, text=True, timeout=300)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        afresh.returncode, afresh.stdout, afresh.stderr) == (
        2, "", "error: config.data.path is empty: set it to the folder of images\n")


@pytest.mark.slow
def test_a_command_past_its_timeout_is_killed_and_each_has_its_own_devices(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        commands.train(tmp_path / "long", "--config.total_steps=100000", timeout=8)
    # Killed, so its workdir is free again (a live trainer's lock would refuse a second one); and
    # jax's backend starts in each child, so a command gets the device count it asks for.
    again = commands.train(tmp_path / "long", "--config.total_steps=1", devices=2)
    assert "in use by another trainer" not in again.stderr
    assert "on 2 devices (cpu)" in again.stdout, again.stdout
