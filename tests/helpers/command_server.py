"""A process that has imported what our commands import (jax, flax, orbax, the package's libraries)
and forks one child per command, which runs `python -m MODULE ARGS` as the interpreter would:
the tests' commands start without their ~2.5 s of imports (`tests/helpers/commands.py` uses it).

The child is a process of its own (its pid, signals, exit status, stdout and stderr, atexit and
thread shutdown as at any interpreter exit); only the imports are shared. jax's backend starts in
the child, so XLA_FLAGS (the simulated device count) may differ per command; every other
variable must equal this server's environment (`cli.py` checks, else starts a real subprocess).

Protocol, one JSON object per line: in on stdin {"module", "args", "env", "cwd", "stdout",
"stderr"} (the last two: files the child writes); out on stdout {"started": pid} right after each
fork, and {"exited": pid, "returncode": rc} when a child ends (-N: killed by signal N). Ends at
EOF on stdin.
"""

import gc
import json
import os
import runpy
import select
import sys

# Libraries only: a command's own module (train, lit, plan, ablate, …) defines its absl flags as
# __main__, and must run from scratch in the child. The last two are imported by the package
# only where they are used (scikit-learn's probes: ~1.4 s; pyarrow).
PRELOAD = ("mlcd_jax.training.loop", "mlcd_jax.training.step", "mlcd_jax.interop.weights",
           "mlcd_jax.training.input",
           "mlcd_jax.evaluate.run", "mlcd_jax.evaluate.features", "mlcd_jax.labels.embed",
           "mlcd_jax.models.text", "mlcd_jax.data.tokenizer", "mlcd_jax.labels.assign",
           "sklearn.linear_model", "pyarrow.parquet")


def run_child(request: dict) -> None:
    """In the forked child: become `python -m module args` and never return."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)  # SystemExit (here or from the command) ends the interpreter as usual


def send(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def serve() -> None:
    from mlcd_jax.runtime import backend
    backend.choose()  # as every command starts: jax and its plugins quietly
    for name in PRELOAD:
        __import__(name)
    # The imported objects out of the garbage collector's reach: a child's collections would
    # otherwise walk all of them, writing to (and so copying) every page of the server's heap.
    # Four forked 10-step tiny trainings: 13.7-18.6 s without, 9.7-12.0 s with.
    gc.freeze()
    pending, children = b"", 0
    while True:
        readable, _, _ = select.select([0], [], [], 0.02)
        if readable:
            data = os.read(0, 1 << 16)
            if not data:
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                pid = os.fork()
                if pid == 0:
                    run_child(json.loads(line))
                children += 1
                send({"started": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children -= 1
            send({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
