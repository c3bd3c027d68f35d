"""mlcd_jax.runtime.backend: every "auto" choice resolved from the target's platform (the devices a
program is compiled for, not the machine that compiles it), and a CPU machine's commands quiet
with libtpu and the CUDA plugin installed."""

import os
import signal
import subprocess
import sys
import types

import pytest

from mlcd_jax.runtime import backend as platform

from helpers.commands import REPO


def devices(name):
    return [types.SimpleNamespace(platform=name)]


def test_target_is_the_devices_platform_not_this_machines():
    assert platform.target() == "cpu"  # this process: simulated CPU devices
    assert platform.target(devices("gpu")) == "gpu"
    assert platform.target(devices("cuda")) == "gpu"
    assert platform.target(devices("rocm")) == "gpu"
    assert platform.target(devices("tpu")) == "tpu"
    with pytest.raises(ValueError, match="unknown platform"):
        platform.target(devices("banana"))


@pytest.mark.parametrize("where, attention, attention_f32, backend, labels, embed, workers", [
    ("cpu", "xla", "xla", "faiss", "float32", "float32", 0),
    ("gpu", "cudnn", "xla", "jax", "float16", "bfloat16", len(os.sched_getaffinity(0))),
    ("tpu", "xla", "xla", "jax", "bfloat16", "bfloat16", len(os.sched_getaffinity(0))),
])
def test_auto_choices_by_platform(where, attention, attention_f32, backend, labels, embed,
                                  workers):
    assert platform.attention("auto", "bfloat16", where) == attention
    assert platform.attention("auto", "float16", where) == attention
    assert platform.attention("auto", "float32", where) == attention_f32
    assert platform.labels_backend("auto", where) == backend
    assert platform.labels_dtype("auto", where) == labels
    assert platform.embed_dtype("auto", where) == embed
    assert platform.data_workers(-1, where) == workers


def test_an_explicit_choice_is_kept_everywhere():
    for where in platform.PLATFORMS:
        assert platform.attention("xla", "bfloat16", where) == "xla"
        assert platform.attention("cudnn", "bfloat16", where) == "cudnn"
        assert platform.labels_backend("faiss", where) == "faiss"
        assert platform.labels_dtype("bfloat16", where) == "bfloat16"
        assert platform.embed_dtype("float16", where) == "float16"
        assert platform.data_workers(3, where) == 3


def test_without_a_platform_auto_resolves_for_this_process():
    assert platform.attention("auto", "bfloat16") == "xla"  # CPU devices here
    assert platform.labels_backend("auto") == "faiss"


def quiet_block(*lines: str) -> subprocess.CompletedProcess:
    """A Python process that writes the noise line and then `lines` of code inside the block."""
    script = "\n".join((
        "import os, sys", "from mlcd_jax.runtime import backend as platform",
        "with platform.quiet_native_logs():",
        "    os.write(2, b'I0000 00:00 1 cudart_stub.cc:31] Could not find cuda drivers\\n')",
        *lines))
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_native_noise_is_filtered_and_everything_else_passes(tmp_path):
    """Lines written to file descriptor 2 (as native libraries write) inside the block: the
    known noise is dropped, any other line reaches stderr."""
    done = quiet_block("    os.write(2, b'WARNING: All log messages before absl::InitializeLog() "
                       "is called are written to STDERR\\n')",
                       "    os.write(2, b'a real problem\\n')",
                       "print('after', file=sys.stderr)")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["a real problem", "after"]


def test_a_native_abort_inside_the_block_still_shows_what_it_printed():
    """A native library that prints its failed check and aborts the process inside the block (as
    libtpu's compiler did on a plan): its line reaches stderr, the noise does not, the process
    ends by SIGABRT; before, the line died in a temporary file and the plan ended without a word."""
    done = quiet_block(
        "    os.write(2, b'F0000 scatter_emitter.cc:3005] Check failed: operand_indices\\n')",
        "    os.abort()")
    assert done.returncode == -signal.SIGABRT, (done.returncode, done.stderr)
    assert "scatter_emitter.cc:3005] Check failed: operand_indices" in done.stderr
    assert "cuda drivers" not in done.stderr


def test_a_process_left_running_by_the_block_does_not_hold_it_open():
    """A process started inside the block that outlives it keeps the filter's pipe open: the
    block ends after FILTER_WAIT_S, not when that process ends (10 minutes: past the helper's
    timeout); what was printed before passes."""
    done = quiet_block("    platform.FILTER_WAIT_S = 1",
                       "    os.write(2, b'before the end\\n')",
                       "    import subprocess, time; time.sleep(0.5)",
                       "    lingering = subprocess.Popen(['sleep', '600'])",
                       "print('after', flush=True); lingering.kill()")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["before the end"] and done.stdout == "after\n"


def test_noise_patterns_name_what_libtpu_and_cuda_print():
    noise = [
        "I0000 00:00:1796210563.429561 4386 cudart_stub.cc:31] Could not find cuda drivers on "
        "your machine, GPU will not be used.",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "Failed to find host bounds for accelerator type: WARNING: could not determine TPU "
        "accelerator type, please set env var `TPU_ACCELERATOR_TYPE` manually, otherwise "
        "libtpu.so may not properly initialize.",
        "E0000 00:00:1796210786.990983 8258 common_lib.cc:554] INVALID_ARGUMENT: Error: "
        "unexpected worker hostname 'WARNING: could not determine TPU worker hostnames or IP "
        "addresses' from env var TPU_WORKER_HOSTNAMES.",
        "=== Source Location Trace: === ",
        "learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327",
    ]
    assert all(platform.NOISE.search(line) for line in noise)
    assert not platform.NOISE.search("error: config.batch_size: must be ≥ 1, got 0")


# What libtpu and the CUDA plugin print on a machine without their devices.
LOUD = (r"cudart|cuda drivers|Unable to load CUDA|plugin configuration error|libtpu|TPU_"
        r"|InitializeLog|InitGoogle")


@pytest.mark.slow
def test_a_command_on_this_cpu_prints_no_tpu_or_cuda_lines(tmp_path):
    """A user's command as typed (no JAX_PLATFORMS): with libtpu and the CUDA plugin installed
    (the test extra, `make plan-env`), nothing of theirs reaches the screen, and it runs on the
    CPU."""
    import re
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-m", "mlcd_jax.train", "--config=configs/test_tiny.py",
                           f"--workdir={tmp_path}", "--compile_only"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(cpu)" in done.stdout
    loud = [line for line in (done.stdout + done.stderr).splitlines() if re.search(LOUD, line)]
    assert not loud, loud


@pytest.mark.parametrize("hidden", ["jax_plugins", "jax_plugins.xla_cuda12"])
def test_a_plain_install_without_the_cuda_plugin_imports(hidden):
    """The plain install (`make demo`, no plan-env) has no jax_plugins package at all: importing
    mlcd_jax must not ask for its submodule (that raises), and must find no plugin."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = (f"import sys; sys.modules[{hidden!r}] = None\n"  # None in sys.modules: not installed
            "from mlcd_jax.runtime import backend as platform\n"
            "platform.choose()\n"  # as every command starts
            "import jax\n"
            "assert not platform.gpu_plugin_installed()\n"
            "print(jax.default_backend())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "cpu"
