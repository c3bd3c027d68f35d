import pytest
from jax.sharding import AxisType, PartitionSpec as P

from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import step


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
    import jax
    import jax.numpy as jnp
    mesh = mesh_lib.make_mesh([("data", 4), ("model", 2)])
    x = jax.device_put(jnp.zeros((mesh_lib.padded_num_classes(37, 8), 3)),
                       mesh_lib.class_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(5, 3)}
    assert mesh_lib.padded_num_classes(37, 8) == 40
    assert mesh_lib.padded_num_classes(40, 8) == 40


def test_train_state_shardings_and_the_guard_against_silent_replication(devices):
    """Every parameter and its Adam moments share one sharding; a weight an axis cannot divide is
    reported with its size instead of being replicated without a word."""
    import jax
    import optax
    from flax import nnx

    from mlcd_jax.models import vit
    cfg = vit.vit_config("tiny", embed_dim=16)   # width 64, mlp 128
    abstract = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
    encoder = nnx.state(abstract)
    params = {"encoder": nnx.to_pure_dict(encoder),
              "centers": jax.ShapeDtypeStruct((64, 16), "float32")}
    state = {"params": params, "opt_state": jax.eval_shape(optax.adamw(1e-3).init, params),
             "step": jax.ShapeDtypeStruct((), "int32")}
    mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)])
    shardings = step.state_shardings(state, encoder, mesh)
    kernel = shardings["params"]["encoder"]["blocks"]["fc1"]["kernel"]
    assert kernel.spec == P(None, "fsdp", None)
    adam_mu = shardings["opt_state"][0].mu  # Adam's first moment mirrors the parameters
    assert adam_mu["encoder"]["blocks"]["fc1"]["kernel"] == kernel
    assert adam_mu["centers"] == mesh_lib.class_sharding(mesh)
    assert shardings["opt_state"][0].count == mesh_lib.replicated(mesh)
    assert mesh_lib.replicated_parameters(encoder, mesh, min_bytes=1) == []
    three = mesh_lib.make_mesh([("data", 2), ("fsdp", 3)], devices[:6])  # 64 % 3 ≠ 0
    found = mesh_lib.replicated_parameters(encoder, three, min_bytes=50_000)
    assert found and all("not divisible by mesh axis 'fsdp' of size 3" in f for f in found)
    assert any(f.startswith("blocks.fc1.kernel (2, 64, 128) (0.1 MiB) is whole") for f in found)
    assert mesh_lib.replicated_parameters(encoder, three, min_bytes=1 << 30) == []
