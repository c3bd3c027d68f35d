"""Where a test run's CPU goes, process by process (docs/testing.md, "When it grows").

    MLCD_PROFILE=/tmp/prof.jsonl PYTHONPATH=tests/profile \\
        .venv/bin/python -m pytest -n 2 --maxschedchunk 2 -p no:cacheprovider tests
    .venv/bin/python tests/profile/report.py /tmp/prof.jsonl

Python imports this module as every process starts whose PYTHONPATH names this folder (the
pytest workers, the command server, every command a test runs, the launcher's processes); with
MLCD_PROFILE set it sums jax's compile events, and per program its seconds compiling, compiles
and cache reads, and writes one JSON line per process at exit."""

import os

if os.environ.get("MLCD_PROFILE"):
    import atexit  # noqa: I001  (mlcd_jax before jax, as every command imports them)
    import json
    import sys
    import time

    from mlcd_jax.runtime import backend
    backend.choose()  # jax started quietly, as in every command
    import jax.monitoring

    _events: dict = {}
    _programs: dict = {}  # program name: [seconds compiling, compiles, cache reads]
    _read = False         # jax times a cache read inside the compile event that follows it
    _start = time.time()

    def _listen(event, duration, fun_name=None, **_):
        global _read
        total, count = _events.get(event, (0.0, 0))
        _events[event] = (total + duration, count + 1)
        if event == "/jax/compilation_cache/cache_retrieval_time_sec":
            _read = True
        elif event == "/jax/core/compile/backend_compile_duration":
            program = _programs.setdefault(fun_name or "?", [0.0, 0, 0])
            if _read:
                program[2] += 1
            else:
                program[0] += duration
                program[1] += 1
            _read = False

    def _write():
        t = os.times()  # a forked child's start at zero
        line = {"pid": os.getpid(), "argv": sys.argv[:3], "wall": time.time() - _start,
                "cpu": t.user + t.system, "events": _events, "programs": _programs,
                "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}
        with open(os.environ["MLCD_PROFILE"], "a") as f:  # one short write per process
            f.write(json.dumps(line) + "\n")

    def _forked():  # a command forked from the command server counts its own events
        global _start, _read
        _events.clear()
        _programs.clear()
        _start, _read = time.time(), False

    jax.monitoring.register_event_duration_secs_listener(_listen)
    os.register_at_fork(after_in_child=_forked)
    atexit.register(_write)
