import pytest
from jax.sharding import AxisType, PartitionSpec as P

from mlcd_jax import mesh as mesh_lib


@pytest.mark.parametrize("axes, want", [
    ([("data", -1)], {"data": 8}),
    ([("data", 2), ("fsdp", -1)], {"data": 2, "fsdp": 4}),
    ({"data": -1, "model": 2}, {"data": 4, "model": 2}),
    ([("data", 2), ("fsdp", 2), ("model", 2)], {"data": 2, "fsdp": 2, "model": 2}),
])
def test_make_mesh_fills_and_is_auto(devices, axes, want):
    mesh = mesh_lib.make_mesh(axes)
    assert dict(mesh.shape) == want
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_make_mesh_on_a_subset(devices):
    mesh = mesh_lib.make_mesh([("data", -1)], devices[:2])
    assert dict(mesh.shape) == {"data": 2}


@pytest.mark.parametrize("axes, message", [
    ([("data", 3), ("model", -1)], "does not divide"),
    ([("data", 4)], "use 4 devices but 8"),
    ([("data", -1), ("model", -1)], "at most one axis"),
    ([("data", 0)], "positive or -1"),
    ([("data", 2), ("data", 4)], "distinct"),
    (["data"], "pairs"),
])
def test_make_mesh_errors_name_the_problem(devices, axes, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.make_mesh(axes)


def test_batch_and_class_specs(devices):
    mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 2), ("model", 2)])
    assert mesh_lib.batch_axes(mesh) == ("data", "fsdp")
    assert mesh_lib.num_batch_shards(mesh) == 4
    assert mesh_lib.batch_spec(mesh) == P(("data", "fsdp"))
    assert mesh_lib.class_spec(mesh) == P(("data", "fsdp", "model"))
    model_only = mesh_lib.make_mesh([("model", -1)])
    assert mesh_lib.batch_spec(model_only) == P(None)
    assert mesh_lib.num_batch_shards(model_only) == 1


def test_class_sharding_splits_rows_over_every_device(devices):
    import jax.numpy as jnp
    import jax
    mesh = mesh_lib.make_mesh([("data", 4), ("model", 2)])
    x = jax.device_put(jnp.zeros((mesh_lib.padded_num_classes(37, 8), 3)),
                       mesh_lib.class_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(5, 3)}
    assert mesh_lib.padded_num_classes(37, 8) == 40
    assert mesh_lib.padded_num_classes(40, 8) == 40
