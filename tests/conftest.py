"""Every test process sees 8 simulated CPU devices, compiles with LLVM at -O0, and shares one
compilation cache per run: all must be set before jax is imported.

-O0 (tests/helpers/commands.py's FAST_COMPILE; the commands tests start compile at -O1, its
COMMAND_COMPILE): the suite compiles hundreds of small programs (a float64 reference's sharded head
on 1, 2, 4 and 8 devices, each option), where XLA's backend compile is most of the time and the
machine code's speed does not matter at test shapes; at -O0 they compile ~30 % faster
(tests/training/test_sharded_head.py's sharded-vs-reference tests: 91 → 66 s). Only LLVM's code
generation changes: XLA's HLO passes (fusion, SPMD partitioning, the collectives) are the same.

The cache: jax's persistent compilation cache in a directory made fresh by the run's first process
(pytest's, or xdist's controller) and inherited through the environment by its workers and every
command they start (`tests/helpers/commands.py`), so a program the suite compiles once (a tiny
train step, a LiT step, an evaluation forward) is read back by the next test instead of compiled
again. A fresh directory per run: nothing compiled by another version of the code is ever reused.
It is removed when the run ends.
"""

import compileall
import os
import pathlib
import shutil
import tempfile

from helpers.commands import FAST_COMPILE, xla_flags  # noqa: E402  (the standard library only)

os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""), xla_flags(8, FAST_COMPILE)) if f)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE = "PYTEST_XDIST_WORKER" not in os.environ  # this process made the directory
if _OWN_CACHE:
    # The package's bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (this machine's
    # environment sets it), every process the suite starts would compile mlcd_jax/ from source
    # (~0.35 s each).
    compileall.compile_dir(pathlib.Path(__file__).parents[1] / "mlcd_jax", quiet=1)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlcd_jax_tests_xla_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program, even quick
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

from mlcd_jax.runtime import backend  # noqa: E402,I001

backend.choose()  # jax started (and its plugins registered) quietly, as in every command
import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The slow tests (commands in subprocesses) first, in their files' order: with two workers
    the long ones start early and the quick ones fill the gaps at the end, instead of a long test
    starting last and running alone. This needs workers that take a test or two at a time
    (`make test`: `--maxschedchunk 2`): xdist's default hands each worker a quarter of the
    suite up front, which put every slow test on one worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 simulated devices, got {len(devs)} (XLA_FLAGS not applied?)"
    return devs
