"""Orbax checkpoints of the train state and the data-iterator state; mesh-independent restore.

A checkpoint holds `state` (params, optimizer state, step; every process writes its own shards) and
`data` (JSON: the iterator state and the seed). Restoring takes abstract arrays carrying the current
mesh's shardings, so a checkpoint saved on 8 devices restores on 4 (or on another host count).
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory, *, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        """Starts an asynchronous save; training goes on while it is written."""
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def restore(self, abstract_state, step: int | None = None, *, resizable: str = "centers"):
        """(state, data_state) of `step` (default: latest), laid out as `abstract_state` says.

        Arrays under a `resizable` key (the class centers and their optimizer moments, padded to a
        multiple of the device count) may differ in their first dimension: padding rows are
        dropped or added (as zeros; they are never used). Any other difference is an error.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        stored = self.manager.item_metadata(step)["state"]
        resized = False
        for (path, want), (_, have) in zip(_leaves(abstract_state), _leaves(stored), strict=True):
            if tuple(want.shape) == tuple(have.shape):
                continue
            name = jax.tree_util.keystr(path)
            if resizable in name and tuple(want.shape[1:]) == tuple(have.shape[1:]):
                resized = True
                continue
            raise ValueError(f"{self.directory / str(step)}: {name} has shape {tuple(have.shape)} "
                             f"but this config needs {tuple(want.shape)}; resume with the config "
                             "that wrote the checkpoint, or start in a new workdir")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state, strict=not resized),
            data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract) with `shardings`: a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]
