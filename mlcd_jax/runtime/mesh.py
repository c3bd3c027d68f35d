"""Device mesh from config, and the shardings every module agrees on.

A mesh is given as ordered (axis name, size) pairs, big_vision style: ``[("data", -1)]`` or
``[("data", 2), ("fsdp", -1)]``; one size may be -1 and takes the devices left over. The batch is
split over the *batch axes* (the mesh's axes named in ``BATCH_AXES``); the K class centers of the
head are split over *every* device of the mesh, whatever the axes are called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax.runtime.errors import UserError

# Axes over which the global batch is split. Any other axis (e.g. "model") sees the whole batch.
BATCH_AXES = ("data", "fsdp")

MeshSpec = Sequence[tuple[str, int]] | Mapping[str, int]


def resolve_axis_sizes(axes: MeshSpec, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Names and sizes of the mesh axes, with a -1 size filled by the devices left over."""
    pairs = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise UserError("mesh: expected (axis name, size) pairs such as [('data', -1)], "
                        f"got {axes!r}")
    names = tuple(str(name) for name, _ in pairs)
    sizes = [int(size) for _, size in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"mesh: axis names must be distinct, got {names}")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh: sizes must be positive or -1 (fill), got "
                        f"{dict(zip(names, sizes))}")
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise UserError(f"mesh: at most one axis may have size -1, got {dict(zip(names, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if fills:
        if num_devices % fixed:
            raise UserError(
                f"mesh: the fixed axis sizes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices, so axis {names[fills[0]]!r} = -1 cannot be filled; "
                "change the sizes so that their product divides the device count")
        sizes[fills[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(
            f"mesh: axis sizes {dict(zip(names, sizes))} use {fixed} devices but {num_devices} are "
            "available; make the product equal the device count, or set one size to -1")
    return names, tuple(sizes)


def make_mesh(axes: MeshSpec = (("data", -1),),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with automatic-sharding axes over `devices` (default: all devices of all
    processes)."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = resolve_axis_sizes(axes, len(devices))
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU); Auto axis types
    # keep jit's automatic sharding propagation (jax 0.10 defaults to Explicit).
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the global batch, in mesh order."""
    return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_spec(mesh: Mesh, leading: int = 0) -> P:
    """`leading` whole dimensions (the trainer's micro-batches), then the batch dimension split over
    the batch axes; other dimensions whole."""
    axes = batch_axes(mesh)
    return P(*([None] * leading), axes if axes else None)


def class_spec(mesh: Mesh) -> P:
    """Leading (class) dimension split over every device of the mesh."""
    return P(tuple(mesh.axis_names))


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, leading))


def class_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, class_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_array(value, sharding: NamedSharding) -> jax.Array:
    """`value`, the same whole array on every process (numpy, or a jax array this process holds
    whole), as one array laid out by `sharding` over every process's devices: each process places
    its own devices' parts (device_put would move a device's array across hosts, which CPU and
    some GPU backends refuse). An array already spread over the job is resharded."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def padded_num_classes(num_classes: int, num_shards: int) -> int:
    """Smallest multiple of `num_shards` that holds `num_classes` rows (each shard gets K_local
    rows)."""
    return -(-num_classes // num_shards) * num_shards


# Logical parameter axes (the `logical_axes` metadata of model parameters) → mesh axes. A rule
# applies only when the mesh has that axis and it divides the dimension; otherwise the dimension is
# replicated (and `replicated_parameters` says so). "embed" over "fsdp" is ZeRO-3 style sharding
# of every large weight.
LOGICAL_RULES = (("embed", "fsdp"), ("mlp", "model"), ("heads", "model"))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> P:
    """PartitionSpec for a parameter of `shape` whose trailing dimensions are named `axes` (leading
    extra dimensions, such as the stacked layers of a scanned model, are replicated)."""
    rules = dict(rules)
    spec, used = [None] * (len(shape) - len(axes)), set()
    for name, size in zip(axes, shape[len(shape) - len(axes):]):
        axis = rules.get(name)
        ok = axis in mesh.shape and axis not in used and size % mesh.shape[axis] == 0
        spec.append(axis if ok else None)
        used.add(axis if ok else None)
    return P(*spec)


def param_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for an nnx State (abstract or concrete) from its parameters' logical axes."""
    from flax import nnx

    def one(variable):
        axes = variable.get_metadata().get("logical_axes", ())
        return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_parameters(abstract_encoder, mesh: Mesh, min_bytes: int = 1 << 20,
                          rules=LOGICAL_RULES) -> list[str]:
    """One line for each parameter of at least `min_bytes` that a rule would split over a mesh
    axis of size > 1 but that stays whole on it, because the axis does not divide its dimension:
    memory the user believes is sharded and is not (MaxText's
    `assert_params_sufficiently_sharded` guards the same)."""
    from flax import nnx
    rules, found = dict(rules), []
    for path, variable in nnx.to_flat_state(abstract_encoder):
        axes = variable.get_metadata().get("logical_axes", ())
        shape = variable.shape
        spec = logical_to_spec(axes, shape, mesh, rules)
        for name, size, got in zip(axes, shape[len(shape) - len(axes):],
                                   spec[len(shape) - len(axes):]):
            axis = rules.get(name)
            if axis in mesh.shape and mesh.shape[axis] > 1 and got is None:
                nbytes = math.prod(shape) * variable.dtype.itemsize
                if nbytes >= min_bytes:
                    found.append(f"{'.'.join(map(str, path))} {tuple(shape)} ({nbytes / 2**20:.1f} "
                                 f"MiB) is whole on every device: its {name!r} dimension {size} is "
                                 f"not divisible by mesh axis {axis!r} of size {mesh.shape[axis]}")
    return found
