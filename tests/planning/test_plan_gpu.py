"""`python -m mlcd_jax.plan` for GPUs: the trainer's step compiled on this CPU for H200 / H100
meshes by XLA's GPU compiler (jax's CUDA plugin, no driver, no GPU), the program it builds read
back (cuDNN attention, no attention-score buffer, temporaries under remat, head memory that
follows the device count). Skips only where the plugin is not installed (`make plan-env`; `make
test` installs it)."""

import json
import re
import subprocess
import sys

import pytest

from mlcd_jax.planning import gpu_specs, hlo
from mlcd_jax.runtime import backend
from mlcd_jax.runtime.errors import UserError

from helpers.commands import REPO

GiB = 2 ** 30

needs_plugin = pytest.mark.skipif(not backend.gpu_plugin_installed(),
                                  reason="jax's CUDA plugin is not installed (make plan-env)")


def recipe(size="B/16", **fields):
    """configs/mlcd_laion400m.py:`size` with `fields` ("section.name": value) set."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("recipe", REPO / "configs/mlcd_laion400m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(size)
    for key, value in fields.items():
        section, name = key.split(".") if "." in key else (None, key)
        (c[section] if section else c)[name] = value
    return c


def test_the_scores_check_sees_scores():
    """The check the cuDNN test relies on finds (B, heads, T, T) arrays in any order, and not
    the same numbers in other shapes."""
    program = hlo.Program(
        "ENTRY %main (p: f32[1]) -> f32[1] {\n"
        "  %a = f32[256,12,197,197]{3,2,1,0} fusion(%x), kind=kLoop, calls=%f\n"
        "  %b = bf16[1,256,12,197,197]{4,3,2,1,0} fusion(%y), kind=kLoop, calls=%f\n"
        "  %c = bf16[256,197,12,64]{3,2,1,0} fusion(%z), kind=kLoop, calls=%f\n"
        "  ROOT %d = bf16[12,256,197,768]{3,2,1,0} fusion(%w), kind=kLoop, calls=%f\n"
        "}\n")
    assert program.arrays_shaped([256, 12, 197, 197]) == ["bf16[1,256,12,197,197]",
                                                          "f32[256,12,197,197]"]
    assert program.arrays_shaped([256, 12, 256, 256]) == []


@needs_plugin
@pytest.mark.slow
def test_b16_recipe_on_one_h200_uses_cudnn_attention_and_fits():
    """The paper's B/16 recipe (remat of every block, bf16) at batch 256 on one H200: "auto"
    attention is cuDNN's fused kernel (the target is a GPU, though this machine is a CPU), no
    (B, heads, T, T) scores exist, and the temporaries stay under 10 GiB."""
    from mlcd_jax.planning import plan
    r = plan.plan(recipe(batch_size=256), "h200:1")
    assert r["platform"] == "gpu" and r["device_kind"].startswith("NVIDIA H200")
    assert r["attention"] == "cudnn" and r["program"]["cudnn_attention"]
    assert "__cudnn$fmhaSoftmaxBackward" in r["program"]["library_targets"]
    assert r["program"]["attention_scores"] == []
    assert r["remat"] and r["temporary_gib"] <= 10, r["temporary_gib"]
    assert r["fits"] and 140 < r["hbm_gib"] < 142
    p = r["program"]
    assert p["fusions"] > 0 and p["library_calls"] > 0 and not p["collectives"]
    assert len(p["largest_temporaries"]) == 5 and p["largest_temporaries"][0]["shapes"]
    roof = p["roofline"]
    assert roof["estimate"] and roof["step_s"] == max(roof["flops_s"], roof["hbm_s"]) > 0


@needs_plugin
@pytest.mark.slow
def test_b16_recipe_on_two_hosts_of_eight_gpus():
    """2 hosts × 8 H100s, 256 images per GPU: 16 devices over two processes, the gradients
    all-reduced, temporaries per GPU under 10 GiB with remat."""
    from mlcd_jax.planning import plan
    r = plan.plan(recipe(batch_size=16 * 256), "h100:2x8")
    assert r["devices"] == 16 and r["mesh"] == {"data": 16}
    assert r["device_kind"].startswith("NVIDIA H100")
    assert r["program"]["cudnn_attention"] and r["temporary_gib"] <= 10, r["temporary_gib"]
    assert r["program"]["collectives"]["all-reduce"]["bytes"] > 0


def head_dominated():
    """The tiny encoder with a head of 2^20 × 128 centers (+ two Adam moments: 1.5 GiB)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs/test_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.head.num_classes, c.head.sample_ratio, c.model.embed_dim = 2 ** 20, 0.01, 128
    c.model.dtype = "bfloat16"
    return c


@needs_plugin
@pytest.mark.slow
def test_head_memory_per_gpu_halves_from_8_to_16_gpus(tmp_path):
    """The command as a user types it for 8 H200s (its table, its JSON, nothing from CUDA on the
    screen), and 16: the head's per-device memory falls as 1/n (within 10 %)."""
    out = tmp_path / "plan.json"
    done = subprocess.run(
        [sys.executable, "-m", "mlcd_jax.plan", "--config=configs/test_tiny.py",
         "--topology=h200:8", "--config.head.num_classes=1048576",
         "--config.head.sample_ratio=0.01", "--config.model.embed_dim=128",
         "--config.model.dtype=bfloat16", f"--json={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("per device: arguments", "program:", "collectives per step:",
                 "largest temporaries:", "roofline (an estimate):"):
        assert line in done.stdout, done.stdout
    assert not re.search(r"cudart|cuda drivers|CUDA libraries|CUB", done.stdout + done.stderr)
    eight = json.loads(out.read_text())
    from mlcd_jax.planning import plan
    sixteen = plan.plan(head_dominated(), "h200:2x8")
    assert eight["devices"] == 8 and sixteen["devices"] == 16
    ideal = 3 * 4 * 2 ** 20 * 128 / GiB  # centers + 2 moments, float32, in all
    assert ideal / 8 <= eight["argument_gib"] <= 1.1 * ideal / 8
    ratio = eight["total_gib"] / sixteen["total_gib"]
    assert 2 / 1.1 <= ratio <= 2 * 1.1, (eight["total_gib"], sixteen["total_gib"])


def test_an_unknown_gpu_is_one_line_naming_the_known_ones():
    done = subprocess.run([sys.executable, "-m", "mlcd_jax.plan", "--config=configs/test_tiny.py",
                           "--topology=h300:8"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "unknown GPU 'h300'" in done.stderr and "h200" in done.stderr


def test_a_missing_plugin_is_one_line_naming_the_fix(monkeypatch):
    from mlcd_jax.planning import plan
    monkeypatch.setattr(plan.backend, "gpu_plugin_installed", lambda: False)
    with pytest.raises(UserError, match="make plan-env"):
        plan.target("h200:8")


def test_gpu_figures_come_from_xlas_specs():
    from mlcd_jax.planning import gpu_specs, plan
    h100, h200, b200 = plan.gpu_chip("h100"), plan.gpu_chip("h200"), plan.gpu_chip("b200")
    assert round(h100.bf16_tflops) == round(h200.bf16_tflops) == 989  # NVIDIA's dense bf16
    assert round(b200.bf16_tflops) == 2225
    assert (h100.hbm_gbps, h200.hbm_gbps) == (3352.32, 4800.0)
    assert round(h200.hbm_gib) == 141 and plan.gpu_chip("a100-80g").bf16_tflops == 312
    assert "collective_memory_granularity" not in gpu_specs.target_config("h100")
    assert "collective_memory_granularity" in gpu_specs.SPECS["h100"]  # kept as XLA has it


def test_every_gpu_spec_is_package_data_with_its_figures():
    """One specs/<name>.txtpb per GPU name, no other, each read through importlib.resources and
    carrying what the plan reads from it (memory, bandwidth, cores, the device's name)."""
    import importlib.resources
    folder = importlib.resources.files("mlcd_jax.planning") / "specs"
    files = {f.name for f in folder.iterdir() if f.name.endswith(".txtpb")}
    assert files == {f"{name}.txtpb" for name in gpu_specs.names()}
    for name in gpu_specs.names():
        assert gpu_specs.SPECS[name] == (folder / f"{name}.txtpb").read_text(encoding="utf-8")
        for key in ("device_memory_size", "memory_bandwidth", "core_count"):
            assert gpu_specs.field(name, key) > 0, (name, key)
        assert re.search(r'^device_description_str: "NVIDIA ', gpu_specs.SPECS[name], re.M), name
    with pytest.raises(KeyError):
        gpu_specs.target_config("h300")


@needs_plugin
@pytest.mark.parametrize("name", gpu_specs.names())
def test_xla_parses_every_gpu_spec(name):
    """XLA's GPU compiler takes each spec (as `target_config` gives it): the device it describes
    is the one the spec names."""
    from mlcd_jax.planning import plan
    described = re.search(r'^device_description_str: "(.*)"$', gpu_specs.SPECS[name], re.M)
    devices = plan.target(f"{name}:2").devices
    assert len(devices) == 2 and {d.device_kind for d in devices} == {described.group(1)}
