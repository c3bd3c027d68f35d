"""K = 1,000,000, D = 512 compiled (never run) on 1 and n devices: what the partitioned program
holds and what it moves between devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax.runtime import mesh as mesh_lib
from mlcd_jax.training import sharded_head as head

K, D, B, L = 1_000_000, 512, 256, 8
COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                        r"collective-permute|collective-broadcast)(-start)?\(")


def compile_loss_and_grad(devices, ratio=0.1):
    mesh = mesh_lib.make_mesh([("data", -1)], devices)
    rows = mesh_lib.padded_num_classes(K, mesh.size)
    args = (jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=mesh_lib.batch_sharding(mesh)),
            jax.ShapeDtypeStruct((rows, D), jnp.float32, sharding=mesh_lib.class_sharding(mesh)),
            jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=mesh_lib.batch_sharding(mesh)))

    def loss(features, centers, labels, key):
        return head.mlcd_loss(features, centers, labels, key=key, mesh=mesh, num_classes=K,
                              sample_ratio=ratio)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return step.lower(*args, jax.random.key(0)).compile()


def per_device_bytes(compiled):
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def collective_sizes(compiled):
    """(op, elements of its largest array) for every collective in the partitioned HLO."""
    found = []
    for line in compiled.as_text().splitlines():
        match = COLLECTIVE.search(line)
        if match:
            dims = re.findall(r"\[([\d,]*)\]", match.group(1))
            found.append((match.group(2), max(int(np.prod([int(d) for d in s.split(",") if d]))
                                              for s in dims)))
    return found


@pytest.fixture(scope="module")
def single(devices):
    return compile_loss_and_grad(devices[:1])


@pytest.mark.parametrize("n", [2, 4, 8])
def test_per_device_memory_shrinks_with_devices(devices, single, n):
    sharded = compile_loss_and_grad(devices[:n])
    one, many = per_device_bytes(single), per_device_bytes(sharded)
    # Centers and their gradient alone are 2 × 2 GB on one device: it must split n ways.
    assert one > 2 * K * D * 4
    assert many <= 1.2 * one / n, (many / 2**20, one / 2**20)


def test_no_centers_or_logits_cross_devices(devices):
    sharded = compile_loss_and_grad(devices)
    collectives = collective_sizes(sharded)
    assert ("all-gather", B * D) in collectives  # the features are gathered (the test sees HLO)
    # Nothing larger than the gathered batch of features moves: no K × D centers, no B × K logits.
    largest = max(size for _, size in collectives)
    assert largest <= B * D, collectives


def test_no_whole_logits_in_memory_even_at_r_1(devices):
    """r = 1 scores all 1M classes, but a chunk at a time, forward and backward (logits recomputed
    from per-sample log-sum-exps): temporaries stay far below one B × K float32 array (1 GiB)."""
    compiled = compile_loss_and_grad(devices[:1], ratio=1.0)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < B * K * 4 / 8, temp / 2**20
