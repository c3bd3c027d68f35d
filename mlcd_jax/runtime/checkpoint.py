"""Orbax checkpoints of the train state and the data-iterator state; mesh-independent restore.

A checkpoint holds `state` (params, optimizer state, step; every process writes its own shards) and
`data` (JSON: the iterator state, the seed, and a checksum of every array). Restoring takes abstract
arrays carrying the current mesh's shardings, so a checkpoint saved on 8 devices restores on 4 (or
on another host count). A checkpoint that does not read back whole (a file gone, metadata missing,
an array whose checksum differs) is moved aside as `STEP.corrupt` and the next older one is used.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mlcd_jax.runtime import distributed
from mlcd_jax.runtime.errors import MissingFile, UserError


class ConfigMismatch(UserError):
    """The checkpoint is sound but was written by another config (array shapes differ)."""


class CorruptCheckpoint(UserError):
    """The checkpoint does not read back as it was written."""


class SaveFailed(UserError, OSError):
    """A checkpoint could not be written (a full disk, a lost mount): said in one line."""


class _OrbaxErrorNoise(logging.Filter):
    """Orbax's background threads log each failed write with its traceback (a full disk printed
    ~2,400 lines); the failure also reaches the caller as an exception, said in one line there."""

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and
                    (record.name == "asyncio" or "orbax" in record.pathname))


def _quiet_closed_loop(hook):
    """After a failed write, tensorstore completes its other writes into orbax's closed event
    loop, and each reports 'RuntimeError: Event loop is closed' as unraisable (~1,400 tracebacks
    on a full disk): drop those; anything else goes to `hook`."""
    def unraisablehook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            hook(unraisable)
    unraisablehook.quiet = True
    return unraisablehook


# Orbax splits a replicated array among its replicas so that several hosts write it at once. For
# a small array (a norm's scale, a bias, a test's whole model) the split gains nothing and costs a
# compiled slice program per array shape and a transfer per replica: the tiny trainer compiled 72
# slice programs at its first save (2.8 s) and took 6.4 s warm instead of 5.2. Arrays whose share
# per replica is below this are written whole by one replica; large ones are still split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache  # once per process
def _use_replica_parallel_for_large_arrays_only() -> None:
    from absl import logging as absl_logging
    from orbax.checkpoint._src.metadata import array_metadata_store  # orbax's default; unexported
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # not its "overriding jax.Array" warning
    try:
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(),
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
    finally:
        absl_logging.set_verbosity(verbosity)


class Checkpointer:
    def __init__(self, directory, *, keep: int = 3):
        _use_replica_parallel_for_large_arrays_only()
        for name in ("absl", "asyncio"):
            if not any(isinstance(f, _OrbaxErrorNoise) for f in logging.getLogger(name).filters):
                logging.getLogger(name).addFilter(_OrbaxErrorNoise())
        if not getattr(sys.unraisablehook, "quiet", False):
            sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
        # A failed write makes orbax drop the writes it had queued beside it (its
        # `write_fragment` coroutines) unawaited; Python warns of each when it is collected, after
        # the one-line error. This package runs no coroutines of its own. Set on every
        # Checkpointer: `warnings.catch_warnings` (pytest's too) restores the filters on exit.
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)
        self.directory = pathlib.Path(directory).absolute()
        self._saving = None  # the step of the last save started
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def metadata(self, step: int):
        """The state's tree of array metadata (shape, dtype) as stored at `step`."""
        return self.manager.item_metadata(step)["state"]

    def save(self, step: int, state, data_state: dict) -> None:
        """Starts an asynchronous save (training goes on while it is written); the arrays'
        checksums go into the data item, to be checked on restore."""
        data_state = data_state | {"checksums": checksums(state)}
        self.check()
        previous, self._saving = self._saving, step
        try:
            self.manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))
        except Exception as e:  # orbax first waits for the previous save: it may be that one
            if previous is not None and previous not in self.manager.all_steps():
                self._saving = previous
            raise self._save_failed(e) from e

    def check(self) -> None:
        """Raise `SaveFailed` if an asynchronous save has failed by now (cheap: no waiting)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(e) from e

    def _save_failed(self, e) -> SaveFailed:
        latest = self.latest_step()
        return SaveFailed(f"saving checkpoint {self._saving} to {self.directory} failed "
                          f"({_one_line(e)}); free space or fix the directory, then rerun: it "
                          f"resumes from {'step ' + str(latest) if latest else 'the start'}")

    def restore(self, abstract_state, step: int | None = None, *, resizable: str = "centers"):
        """(state, data_state) of `step` (default: latest), laid out as `abstract_state` says.

        Arrays under a `resizable` key (the class centers and their optimizer moments, padded to a
        multiple of the device count) may differ in their first dimension: padding rows are
        dropped or added (as zeros; they are never used). Any other difference in shape raises
        `ConfigMismatch`; a checkpoint that does not read back whole raises `CorruptCheckpoint`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingFile(f"no checkpoint in {self.directory}")
        where = self.directory / str(step)
        try:
            stored = self.metadata(step)
            stored_leaves = _leaves(stored)
        except Exception as e:  # orbax raises many types for a damaged step directory
            raise CorruptCheckpoint(f"{where}: its metadata does not read ({_one_line(e)})") from e
        if not stored_leaves:
            raise CorruptCheckpoint(f"{where}: its metadata lists no arrays")
        if len(stored_leaves) != len(_leaves(abstract_state)):
            raise ConfigMismatch(f"{where} holds {len(stored_leaves)} arrays but this config's "
                                 f"state has {len(_leaves(abstract_state))}; resume with the "
                                 "config that wrote it, or start in a new workdir")
        # Matched by name, not position: the metadata lists a named tuple's fields (e.g. sparse
        # AdamW's moments) as a dict in sorted order, the state in declaration order.
        stored_by_name = {_names(path): have for path, have in stored_leaves}
        resized = set()
        for path, want in _leaves(abstract_state):
            have = stored_by_name.get(_names(path))
            if have is None:
                raise ConfigMismatch(f"{where} holds no {jax.tree_util.keystr(path)}; resume "
                                     "with the config that wrote it, or start in a new workdir")
            if tuple(want.shape) == tuple(have.shape):
                continue
            name = jax.tree_util.keystr(path)
            if resizable in name and tuple(want.shape[1:]) == tuple(have.shape[1:]):
                resized.add(name)
                continue
            raise ConfigMismatch(f"{where}: {name} has shape {tuple(have.shape)} but this config "
                                 f"needs {tuple(want.shape)}; resume with the config that wrote "
                                 "the checkpoint, or start in a new workdir")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state, strict=not resized),
                data=ocp.args.JsonRestore()))
        except Exception as e:
            raise CorruptCheckpoint(f"{where} does not read back ({_one_line(e)})") from e
        data = dict(restored.data)
        saved = data.pop("checksums", None) or {}  # checkpoints before checksums have none
        bad = [name for name, value in checksums(restored.state).items()
               if name in saved and name not in resized and saved[name] != value]
        if bad:
            raise CorruptCheckpoint(f"{where}: {len(bad)} arrays differ from what was saved "
                                    f"(checksums of {', '.join(bad[:3])}"
                                    f"{' …' if len(bad) > 3 else ''})")
        return restored.state, data

    def restore_newest_good(self, abstract_state, report=print):
        """(state, data_state, step) of the newest checkpoint that reads back whole, or None if
        there is none. Each one that does not is moved aside (`STEP.corrupt`), with one line saying
        why, and the next older one is tried. A checkpoint of another config is an error."""
        for step in reversed(self.steps()):
            try:
                state, data = self.restore(abstract_state, step)
                failure = None
            except CorruptCheckpoint as e:
                state, failure = None, str(e)
            # Every process must agree: one that cannot read its shards makes the step corrupt.
            failures = [f for f in distributed.gather_json(failure) if f]
            if not failures:
                return state, data, step
            self.set_aside(step, "corrupt", failures[0], report)
        return None

    def set_aside(self, step: int, tag: str, why: str, report=print) -> pathlib.Path:
        """Move checkpoint `step` out of the manager's sight (STEP.TAG), keeping its files."""
        self.wait()
        target = self.directory / f"{step}.{tag}"
        n = 1
        while target.exists():
            target, n = self.directory / f"{step}.{tag}.{n}", n + 1
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
            report(f"checkpoint {step} set aside as {target.name}: {why}")
        distributed.barrier(f"checkpoint {step} set aside")
        self.manager.reload()
        return target

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # the asynchronous save in flight failed
            raise self._save_failed(e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


@jax.jit
def _array_checksums(tree):
    """Per array: Σ_i (2i + 1) · word_i mod 2^32 over its raw 32-bit words (16- and 8-bit values
    widened). Exact integer arithmetic, so the same on any mesh; the odd weights make any flipped
    bit, and any two values swapped, change it."""
    def one(x):
        x = jnp.ravel(x)
        if x.dtype.itemsize == 4:
            words = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif x.dtype.itemsize == 2:
            words = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        elif x.dtype.itemsize == 1:
            words = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
        else:  # 8-byte values: two words each
            words = jax.lax.bitcast_convert_type(x, jnp.uint32)
        words = words.ravel()
        weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.sum(words * weights, dtype=jnp.uint32)
    return jax.tree.map(one, tree)


def checksums(state) -> dict[str, int]:
    """{array path: checksum} of a state (sharded or not)."""
    sums = jax.device_get(_array_checksums(state))
    return {jax.tree_util.keystr(path): int(value) for path, value in _leaves(sums)}


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract) with `shardings`: a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _names(path) -> tuple[str, ...]:
    """A leaf's path as plain names, the same for a dict key, an attribute and an index."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _one_line(e: BaseException) -> str:
    """An exception in one line; a long one keeps its start and its end (tensorstore puts the
    cause, e.g. 'No space left on device', last)."""
    text = " ".join(str(e).split())
    if len(text) > 400:
        text = f"{text[:150]} … {text[-250:]}"
    return f"{type(e).__name__}: {text}"
