"""The commands as users run them: `python -m mlcd_jax.<module>` in a subprocess on simulated CPU
devices, and what they wrote (metrics.jsonl, evals.jsonl)."""

import atexit
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
# The suite's compilation cache (tests/conftest.py): a command started with this process's
# environment shares it; one that starts from a clean environment keeps these.
CACHE = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


# The pytest processes' code generation (tests/conftest.py): LLVM at -O0 and XLA's elemental
# emitters instead of its MLIR fusion emitters. The same programs (XLA's HLO passes unchanged),
# compiled faster; their test-sized inputs run in no time.
# Both: one LLVM module per program (XLA splits it into up to 32 to compile them in parallel; with
# both cores busy that only adds each part's own pipeline: ~10 % of compiling, docs/testing.md).
ONE_MODULE = "--xla_cpu_parallel_codegen_split_count=1"
FAST_COMPILE = (f"--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                f"{ONE_MODULE}")
# The commands': LLVM at -O1. Half their CPU time was XLA compiling programs no other test had
# compiled; at -O1 a cold tiny train or LiT compiles ~25 % faster and their steps run as fast as
# at -O2, where at -O0 LiT's steps ran 1.6x slower (docs/testing.md).
COMMAND_COMPILE = f"--xla_backend_optimization_level=1 {ONE_MODULE}"
# The trainer's: FAST_COMPILE. The suite's trainings are a few steps of the micro model, where
# compiling is most of a run (a cold 10-step run of configs/test_tiny.py:regions: 19-22 → 10
# CPU-s); LiT's 150-step runs, the evaluators and the demos do more work per program and stay at
# -O1 (docs/testing.md).
TRAIN_COMPILE = FAST_COMPILE


def compile_for(module: str) -> str:
    return TRAIN_COMPILE if module == "mlcd_jax.train" else COMMAND_COMPILE


def xla_flags(devices: int = 8, compile: str = COMMAND_COMPILE) -> str:
    """XLA_FLAGS of the commands tests start: `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {compile}"


def env(devices: int = 8, compile: str = COMMAND_COMPILE) -> dict:
    return os.environ | {"XLA_FLAGS": xla_flags(devices, compile), "JAX_PLATFORMS": "cpu"}


def command(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


class _CommandServer:
    """tests/helpers/command_server.py, started by this test process when it first runs a
    command: each command is a child forked from it, with the libraries already imported."""

    # Variables a command may have that differ from the server's: read after the fork (by jax's
    # backend as it starts, by pytest), none of them at import.
    PER_COMMAND = ("XLA_FLAGS", "PYTEST_CURRENT_TEST")

    def __init__(self):
        self.env = env()
        server = REPO / "tests" / "helpers" / "command_server.py"
        self.proc = subprocess.Popen([sys.executable, str(server)], cwd=REPO, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._pending = b""

    def serves(self, environ: dict) -> bool:
        def common(e):
            return {k: v for k, v in e.items() if k not in self.PER_COMMAND}
        return self.proc.poll() is None and common(environ) == common(self.env)

    def _message(self, deadline: float) -> dict | None:
        """The server's next message, or None at `deadline`."""
        while b"\n" not in self._pending:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
            assert data, "tests/helpers/command_server.py ended"
            self._pending += data
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def _until(self, key: str, deadline: float, pid=None) -> dict | None:
        """The next message with `key` (for `pid`), or None at `deadline`. The server says a
        child started before it says it exited, and a test runs one command at a time."""
        while True:
            message = self._message(deadline)
            if message is None or (key in message and pid in (None, message[key])):
                return message

    def run(self, module: str, args: list[str], environ: dict, cwd,
            timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = pathlib.Path(tmp, "stdout"), pathlib.Path(tmp, "stderr")
            request = {"module": module, "args": args, "env": environ, "cwd": str(cwd),
                       "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self._until("started", time.time() + 60)["started"]
            exited = self._until("exited", time.time() + timeout, pid)
            if exited is None:
                os.kill(pid, signal.SIGKILL)
                self._until("exited", time.time() + 60, pid)
                raise subprocess.TimeoutExpired(command(module, *args), timeout,
                                                out.read_text(), err.read_text())
            return subprocess.CompletedProcess(command(module, *args), exited["returncode"],
                                               out.read_text(), err.read_text())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_server = None


def run(module: str, *args, devices: int = 8, expect: int | None = 0, timeout: int = 600,
        cwd=REPO, compile: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args`; with `expect`, assert its exit status (stderr on failure).
    Forked from the command server (see _CommandServer), started again where this process's
    environment changed.
    `compile`: XLA's code generation flags ("": XLA's defaults; None: compile_for(module))."""
    global _server
    environ = env(devices, compile_for(module) if compile is None else compile)
    if _server is None or not _server.serves(environ):
        # First use, or this process's environment changed since the server started (a library
        # an earlier test imported set a variable): a server forked with the old one would not
        # be the command started afresh.
        if _server is None:
            atexit.register(lambda: _server.close())
        else:
            _server.close()
        _server = _CommandServer()
    result = _server.run(module, [str(a) for a in args], environ, cwd, timeout)
    if expect is not None:
        assert result.returncode == expect, (result.returncode, result.stderr[-3000:])
    return result


def train_args(workdir, *overrides, config: str = "configs/test_tiny.py") -> list[str]:
    return [f"--config={config}", f"--workdir={workdir}", *overrides]


def train(workdir, *overrides, config: str = "configs/test_tiny.py", **kw):
    """The trainer on `config` (default: the tiny synthetic run) in `workdir`."""
    return run("mlcd_jax.train", *train_args(workdir, *overrides, config=config), **kw)


def records(workdir, name: str = "metrics.jsonl") -> list[dict]:
    path = pathlib.Path(workdir) / name
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(workdir) -> dict[int, float]:
    """{step: loss} as the trainer logged it."""
    return {r["step"]: r["loss"] for r in records(workdir)}


def sigterm_after(module: str, *args, workdir, lines: int = 20, timeout: int = 300,
                  devices: int = 8) -> str:
    """Run `python -m module args`, send SIGTERM once `workdir`/metrics.jsonl has `lines` lines
    (a preemption mid-run), and return its stdout after asserting it saved and exited cleanly."""
    proc = subprocess.Popen(command(module, *args), cwd=REPO,
                            env=env(devices, compile_for(module)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in out
    return out


def user_env() -> dict:
    """A user's shell in the project's environment: its bin first on PATH (`python` is this
    interpreter), the package importable from this checkout, 8 simulated CPU devices (as the
    suite's commands have)."""
    shell = env()
    return shell | {"PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{shell['PATH']}",
                    "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO),
                                                                shell.get("PYTHONPATH"))))}


def bash(script: str, cwd, environ: dict) -> subprocess.CompletedProcess:
    """`script` run by bash (-euo pipefail) in `cwd`, as a user's shell would."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=1500)
