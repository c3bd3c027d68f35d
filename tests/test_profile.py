"""tests/profile/: the opt-in profile of a test run's processes counts each process's compiles
(a forked child its own, as the command server's commands are) and report.py sums them."""

import json
import subprocess
import sys

import pytest

from helpers import commands

# Forks before jax's backend starts, as the command server does; the parent's events before the
# fork (recorded by hand) are not the child's.
SCRIPT = """
import os, sys
import jax
for _ in range(5):
    jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 0.1,
                                              fun_name="by_hand")
if os.fork() == 0:
    sys.argv = ["mlcd_jax.child"]
    jax.jit(lambda x: x - 3.5)(1.0)
    sys.exit(0)
os.wait()
jax.jit(lambda x: x + 1.5)(1.0)
jax.jit(lambda x: x * 2.5)(1.0)
"""


@pytest.mark.slow
def test_each_process_counts_its_own_compiles_and_the_report_sums_them(tmp_path, capsys):
    log = tmp_path / "profile.jsonl"
    script = tmp_path / "two_programs.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, script.name], check=True, cwd=tmp_path, timeout=300,
                   env=commands.env(1) | {"MLCD_PROFILE": str(log),
                                          "PYTHONPATH": str(commands.REPO / "tests" / "profile")})
    lines = {line["argv"][0]: line for line in map(json.loads, log.read_text().splitlines())}
    assert sorted(lines) == sorted([script.name, "mlcd_jax.child"])
    compiles = lambda line: line["events"]["/jax/core/compile/backend_compile_duration"][1]
    assert compiles(lines[script.name]) == 5 + 2 and compiles(lines["mlcd_jax.child"]) == 1
    assert all(line["cpu"] > 0 for line in lines.values())

    sys.path.insert(0, str(commands.REPO / "tests" / "profile"))
    try:
        import report
    finally:
        sys.path.pop(0)
    report.main([str(log)])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.strip()}
    # processes, cpu, compile, programs + cache reads (the suite's cache may hold these)
    assert rows["mlcd_jax.child"][0] == "1"
    assert int(rows["mlcd_jax.child"][3]) + int(rows["mlcd_jax.child"][4]) == 1
    assert int(rows[script.name][3]) + int(rows[script.name][4]) == 5 + 2
    # processes, compile, programs, cache reads: per program, over both processes
    assert rows["by_hand"] == ["1", "0.5", "5", "0"]
    assert rows["jit(<lambda>)"][0] == "2"
    assert int(rows["jit(<lambda>)"][2]) + int(rows["jit(<lambda>)"][3]) == 3
