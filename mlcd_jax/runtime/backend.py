"""The platform a program runs on, and every choice that depends on it, in one place.

`target(devices)` is the platform of the devices a program is compiled for: this machine's
devices when training, a topology's virtual devices when planning for a GPU or TPU this machine
does not have. Every "auto" choice (attention implementation, the label stage's backend and
dtypes, input workers) is resolved from it, so a plan for an H200 builds the program an H200
would run, not the one this CPU would.

`choose()` runs at the start of every command (`runtime/cli.py`), before jax starts, never on
import: without a GPU or TPU device on this machine it sets JAX_PLATFORMS=cpu (unless the user
set it), so jax neither initializes libtpu nor the CUDA plugin, and where the CUDA plugin is
installed without a GPU it imports jax and registers its plugins with the plugin's
driver-not-found lines (printed by its native libraries as they load) filtered out. Nothing else
is filtered: any other line reaches stderr as before.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
import subprocess
import sys

PLATFORMS = ("cpu", "gpu", "tpu")

# Lines native libraries print on a machine without their device, with nothing to act on.
NOISE = re.compile(
    r"cudart_stub\.cc|Could not find cuda drivers|absl::InitializeLog\(\) is called"
    r"|Logging before InitGoogle\(\)|TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES"
    r"|Failed to find host bounds|libtpu_init_utils\.cc|^=== Source Location Trace"
    r"|Missing deviceless CUB|add the deviceless CUB data|^\s*$")


def gpu_present() -> bool:
    """A GPU's device node on this machine: NVIDIA's, AMD's, or WSL's (its GPUs are /dev/dxg)."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")
                or os.path.exists("/dev/dxg"))


def tpu_present() -> bool:
    """A TPU on this machine: its device nodes (/dev/accel* on v2–v4, VFIO groups from v5), or
    the accelerator type a TPU VM sets."""
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
                or os.environ.get("TPU_ACCELERATOR_TYPE"))


def gpu_plugin_installed() -> bool:
    # find_spec of a submodule imports its parent, and raises when the parent is absent too
    return (importlib.util.find_spec("jax_plugins") is not None
            and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def target(devices=None) -> str:
    """"cpu", "gpu" or "tpu": the platform of `devices` (a topology's, a mesh's), or of this
    process's default devices."""
    if devices is None:
        import jax
        name = jax.default_backend()
    else:
        name = next(iter(devices)).platform
    name = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}: expected one of {PLATFORMS}")
    return name


# -- every choice that depends on the platform ----------------------------------------------------
# Each takes the user's choice and the target platform (None: this process's default devices).

def attention(choice: str, dtype: str, platform: str | None = None) -> str:
    """The model's attention: "auto" is cuDNN's fused kernel on GPUs in half precision (it has
    no float32 path), XLA's elsewhere."""
    if choice != "auto":
        return choice
    platform = platform or target()
    return "cudnn" if platform == "gpu" and dtype != "float32" else "xla"


LABEL_BACKENDS = ("auto", "faiss", "jax")  # the label stage's search: faiss (CPU), the mesh


def labels_backend(choice: str, platform: str | None = None) -> str:
    """The label stage's search: "auto" is faiss on CPUs, jax on accelerators."""
    if choice != "auto":
        return choice
    platform = platform or target()
    return "faiss" if platform == "cpu" else "jax"


def labels_dtype(choice: str, platform: str | None = None) -> str:
    """The label stage's scored inputs: "auto" is float16 on GPUs (their matmul peak, and 8 ×
    bf16's precision for cosines in [-1, 1]), bfloat16 on TPUs, float32 on CPUs (whose
    half-precision matmuls are slower)."""
    if choice != "auto":
        return choice
    platform = platform or target()
    return {"gpu": "float16", "tpu": "bfloat16"}.get(platform, "float32")


def embed_dtype(choice: str, platform: str | None = None) -> str:
    """The encoder's compute dtype when embedding images for the label stage: "auto" is bfloat16
    on accelerators, float32 on CPUs."""
    if choice != "auto":
        return choice
    platform = platform or target()
    return "float32" if platform == "cpu" else "bfloat16"


def data_workers(choice: int, platform: str | None = None) -> int:
    """grain worker processes: -1 (automatic) is this process's cores when the devices are
    accelerators, none when they are CPUs (they compute the step on those cores)."""
    if choice >= 0:
        return choice
    platform = platform or target()
    return 0 if platform == "cpu" else len(os.sched_getaffinity(0))


# -- before jax starts ----------------------------------------------------------------------------

def choose() -> None:
    """Pick the platform before jax starts, and start it quietly (see the module's docstring).
    Does nothing once jax has been imported."""
    if "jax" in sys.modules:
        return
    if not os.environ.get("JAX_PLATFORMS") and not (gpu_present() or tpu_present()):
        os.environ["JAX_PLATFORMS"] = "cpu"
    plugin = gpu_plugin_installed()
    with quiet_native_logs() if plugin and not gpu_present() else contextlib.nullcontext():
        import jax  # noqa: F401
        if plugin:  # registering the plugin loads its native libraries: here, not later
            register_plugins()


def register_plugins() -> None:
    """jax's PJRT plugins (the CUDA plugin) registered now; registering starts no backend. The one
    use of jax's private API in the package (tests/runtime/test_backend.py fails when jax moves
    it): jax registers them only when a backend starts, which is too late to quiet them."""
    from jax._src import xla_bridge
    xla_bridge._discover_and_register_pjrt_plugins()


@contextlib.contextmanager
def quiet_native_logs():
    """Run a block with the process's stderr (file descriptor 2, where native libraries write)
    sent through a filter that passes on every line but the NOISE. Python exceptions propagate as
    usual.

    The filter is a process of its own, reading a pipe: when a native library aborts this process
    inside the block (a compiler's failed check, as libtpu's on some programs), what it printed
    before dying still reaches stderr once the pipe closes, instead of dying with it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to filter
        yield
        return
    read, write = os.pipe()
    # -I -S: the standard library only, nothing from the environment or site-packages.
    filter_ = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, NOISE.pattern],
                               stdin=read, stdout=saved, stderr=saved)
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes our end of the pipe: the filter reads to its end and exits
        os.close(saved)
        try:  # a process started in the block and still running holds the pipe open
            filter_.wait(timeout=FILTER_WAIT_S)
        except subprocess.TimeoutExpired:
            filter_.kill()


FILTER_WAIT_S = 60  # how long the block's end waits for the filter to pass on the last lines


# The filter: stdin to stdout, line by line, without the lines matching argv[1].
_FILTER = """import re, sys
noise = re.compile(sys.argv[1])
for line in sys.stdin.buffer:
    if not noise.search(line.decode(errors="replace")):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""
