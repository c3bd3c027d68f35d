"""`python -m mlcd_jax.plan`: the trainer's step compiled for a virtual TPU topology (libtpu's
compiler on this CPU, quietly), memory that follows the sharding, FLOPs against an independent
count. GPUs: tests/planning/test_plan_gpu.py."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mlcd_jax.models import vit
from mlcd_jax.planning import flops

from helpers.commands import REPO


def plan(tmp_path, topology, *overrides):
    out = tmp_path / f"{topology.replace(':', '_')}.json"
    result = subprocess.run(
        [sys.executable, "-m", "mlcd_jax.plan", "--config=configs/test_tiny.py",
         f"--topology={topology}", f"--json={out}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # libtpu's start-up lines on a machine without a TPU (worker hostnames, accelerator type)
    assert not re.search(r"libtpu|TPU_|InitGoogle|InitializeLog", result.stdout + result.stderr)
    return json.loads(out.read_text()), result.stdout


@pytest.mark.slow
def test_tiny_config_compiles_for_a_virtual_tpu_and_head_memory_halves(tmp_path):
    # A head-dominated config: 2^20 centers × 128 (plus two Adam moments) = 1.5 GiB in all.
    head = ["--config.head.num_classes=1048576", "--config.head.sample_ratio=0.01",
            "--config.model.embed_dim=128"]
    four, text = plan(tmp_path, "v5e:2x2", *head)
    eight, _ = plan(tmp_path, "v5e:2x4", *head)
    assert four["devices"] == 4 and eight["devices"] == 8 and four["device_kind"] == "TPU v5 lite"
    assert "per device: arguments" in text and "fits" in text and four["fits"]
    assert four["hbm_gib"] == 16
    ideal = 3 * 4 * 2 ** 20 * 128 / 2 ** 30  # centers + 2 moments, float32, GiB in all
    assert ideal / 4 <= four["argument_gib"] <= 1.1 * ideal / 4
    # The head's state halves with twice the devices; temporaries fall at least as fast (libtpu
    # reuses buffers differently at the two sizes: 0.63 → 0.19 GiB when this test was written).
    assert 2 / 1.2 <= four["argument_gib"] / eight["argument_gib"] <= 2 * 1.2
    assert four["total_gib"] / eight["total_gib"] >= 2 / 1.2
    assert four["tflops_per_step"] > 0 and four["images_per_s"] > 0 and four["days"] > 0


@pytest.mark.slow
def test_a_recipe_that_does_not_fit_says_which_knob_helps(tmp_path):
    big, text = plan(tmp_path, "v5e:2x2", "--config.head.num_classes=400000000",
                     "--config.head.sample_ratio=0.001")  # 400M × 32 × 3 × 4 B ≈ 143 GiB
    assert not big["fits"] and "DOES NOT FIT" in text
    assert (any("fsdp" in tip for tip in big["advice"])
            and any("devices" in tip for tip in big["advice"]))


@pytest.mark.slow
def test_plans_while_another_process_holds_libtpu(tmp_path):
    """libtpu lets one process per machine hold its lockfile; a plan uses no chip, so it runs
    beside another holder (a second plan, a sweep of plans, a test run) instead of failing."""
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    hold = ("from jax.experimental import topologies; "
            "topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2'); "
            "print('holding', flush=True); import sys; sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=REPO, env=env | {
        "JAX_PLATFORMS": "cpu"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        assert pathlib.Path("/tmp/libtpu_lockfile").exists()
        planned, _ = plan(tmp_path, "v5e:2x2")
        assert planned["devices"] == 4
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@pytest.mark.slow
def test_bad_topology_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mlcd_jax.plan", "--config=configs/test_tiny.py",
                             "--topology=v5e-banana"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "--topology='v5e-banana'" in result.stderr


@pytest.mark.parametrize("pos, size", [("learned", 32), ("rope", 48)])
def test_analytic_encoder_flops_match_xla_on_an_unrolled_vit(pos, size):
    cfg = vit.vit_config("tiny", pos=pos, embed_dim=16, image_size=size)
    graphdef, params = nnx.split(vit.ViT(cfg, rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x).embedding)
    x = jnp.zeros((1, size, size, 3))
    counted = forward.lower(params, x).compile().cost_analysis()
    counted = (counted[0] if isinstance(counted, list) else counted)["flops"]
    # XLA also counts elementwise work (norms, softmax, GELU): a few percent on top of matmuls.
    assert 1.0 <= counted / flops.encoder_forward(cfg, size, size) <= 1.15


@pytest.mark.parametrize("size, regions, layers", [(32, 5, 2), (48, 12, 1)])
def test_analytic_region_layer_flops_match_xla(size, regions, layers):
    """RICE's Region Transformer layers (the plan and MFU count them): XLA's count of their
    forward, which also holds the boxes' masks and the softmax, is the analytic matmuls' plus a
    few percent."""
    from mlcd_jax.config.presets import test_tiny as tiny
    from mlcd_jax.models import region
    cfg = vit.vit_config("tiny", embed_dim=16, image_size=size)
    graphdef, params = nnx.split(region.RegionLayers(cfg, layers, rngs=nnx.Rngs(0)))
    grid = (size // cfg.patch,) * 2
    patches = grid[0] * grid[1]
    forward = jax.jit(lambda p, h, b: nnx.merge(graphdef, p)(h, b, grid))
    counted = forward.lower(params, jnp.zeros((1, 1 + patches, cfg.width)),
                            jnp.zeros((1, regions, 4))).compile().cost_analysis()
    counted = (counted[0] if isinstance(counted, list) else counted)["flops"]
    unprojected = dataclasses.replace(cfg, embed_dim=None)  # the ViT's projection runs outside
    assert 1.0 <= counted / flops.region_forward(unprojected, patches, regions, layers) <= 1.15
    with_regions = tiny.get_config("regions")
    counts = flops.per_step(with_regions, vit.from_config(with_regions), 8)
    assert counts["region_forward_per_image"] > 0
    assert flops.per_step(tiny.get_config(), vit.from_config(tiny.get_config()),
                            8)["region_forward_per_image"] == 0
