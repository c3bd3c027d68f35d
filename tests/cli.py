"""The commands as users run them: `python -m mlcd_jax.<module>` in a subprocess on simulated CPU
devices, and what they wrote (metrics.jsonl, evals.jsonl)."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# The suite's compilation cache (tests/conftest.py): a command started with this process's
# environment shares it; one that starts from a clean environment keeps these.
CACHE = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


# The pytest processes' LLVM at -O0 (tests/conftest.py): the same programs (XLA's HLO passes
# unchanged), compiled faster. Not for the commands tests start: their steps, evaluations and LiT
# ran slower at -O0 than their compiles gained (docs/testing.md).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 8) -> str:
    """XLA_FLAGS of the commands tests start: `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices}"


def env(devices: int = 8) -> dict:
    return os.environ | {"XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}


def command(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run(module: str, *args, devices: int = 8, expect: int | None = 0, timeout: int = 600,
        cwd=REPO) -> subprocess.CompletedProcess:
    """Run `python -m module args`; with `expect`, assert its exit status (stderr on failure)."""
    result = subprocess.run(command(module, *args), cwd=cwd, env=env(devices),
                            capture_output=True, text=True, timeout=timeout)
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


def sigterm_after(module: str, *args, workdir, lines: int = 20, timeout: int = 300) -> str:
    """Run `python -m module args`, send SIGTERM once `workdir`/metrics.jsonl has `lines` lines
    (a preemption mid-run), and return its stdout after asserting it saved and exited cleanly."""
    import signal
    import time
    proc = subprocess.Popen(command(module, *args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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
