"""Every script in bench/ at toy size (`--smoke`; the shell scripts' dry runs), so a change that
breaks a benchmark fails here and not on a GPU's minutes. What a smoke run measures means
nothing; that every row starts and the JSON has every field is what is checked."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from helpers.commands import REPO

# Toy programs compile twice as fast without XLA:CPU's expensive optimizations and its MLIR fusion
# emitters (bench/gpu.sh's dry run does the same).
FAST = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
        "--xla_cpu_use_fusion_emitters=false")


def env(**extra):
    return os.environ | {"JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, "PY": sys.executable,
                         "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST}"} | extra


# The Python benches that bench/gpu.sh does not run, each called as `main(argv)` in one process.
RUNNER = """
import importlib, pathlib, sys
sys.path.insert(0, "bench")
from mlcd_jax.runtime import backend  # noqa: I001

backend.choose()  # before jax: the platform, quietly
out = pathlib.Path(sys.argv[1])
jobs = {
    "dense_grad": ["--smoke"],
    "head": ["--smoke", "--ratios", "0.1,1.0", "--json", str(out / "head.json")],
    "labels_paper": ["--smoke", "--out", str(out / "labels_paper.json")],
    "make_embeddings": ["--smoke", "--out", str(out / "embeddings")],
    "pipeline": ["--smoke", "--workers", "0", "--json", str(out / "pipeline.json")],
    "scale": ["--smoke", "--out", str(out / "scale.json"), "--png", str(out / "scale.png"),
              "--work", str(out / "scale_work")],
}
for name, argv in jobs.items():
    status = importlib.import_module(name).main(argv)
    assert not status, (name, status)
    print("smoke passed:", name, flush=True)
"""


def rows(path, *fields):
    data = json.loads(pathlib.Path(path).read_text())
    for row in data["rows"]:
        missing = [f for f in fields if f not in row]
        assert not missing, (path, missing, row)
    return data["rows"]


@pytest.mark.slow
def test_every_python_bench_runs_at_toy_size(tmp_path):
    done = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ran = [line.split()[-1] for line in done.stdout.splitlines()
           if line.startswith("smoke passed:")]
    assert ran == ["dense_grad", "head", "labels_paper", "make_embeddings", "pipeline", "scale"]
    head = rows(tmp_path / "head.json", "devices", "classes", "ratio", "per_device_mib",
                "step_s_median", "vs_single_over_n", "time_vs_r1")
    assert {(r["devices"], r["ratio"]) for r in head} == {(1, 0.1), (2, 0.1), (1, 1.0), (2, 1.0)}
    assert rows(tmp_path / "pipeline.json", "workers", "images_per_s")
    paper = json.loads((tmp_path / "labels_paper.json").read_text())
    assert {"assign top-l", "kmeans step"} <= set(paper)
    scale = json.loads((tmp_path / "scale.json").read_text())
    stages = {r["stage"] for r in scale["results"]}
    assert {"convert", "lookup", "input", "embed", "kmeans", "assign_faiss", "assign_jax",
            "lit"} <= stages, stages
    assert (tmp_path / "scale.png").is_file() and (tmp_path / "embeddings").is_dir()


TRAIN_STEP_FIELDS = ("size", "case", "side", "classes", "ratio", "seconds", "peak_gib",
                     "image_size", "batch", "dtype", "gflop_per_step", "images_per_s", "tflops",
                     "mfu", "mfu_vs_best", "round_s")


@pytest.mark.slow
def test_gpu_sh_dry_run_starts_every_row(tmp_path):
    """bench/gpu.sh's two parts on this CPU at toy size: every command of the GPU run, every row
    of each (the train step's cases, variants, PyTorch eager and compiled), the JSON whole."""
    for part in ("step", "labels"):
        done = subprocess.run(["bash", "bench/gpu.sh", part], cwd=REPO,
                              env=env(DRY_RUN="1", OUT=str(tmp_path)), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "FAILED" not in done.stderr and f"done: {tmp_path}" in done.stdout
    attention = rows(tmp_path / "attention.json", "tokens", "implementation", "multiple")
    assert len(attention) == 10 and all("ms" in r or "refused" in r for r in attention)
    step = rows(tmp_path / "train_step_gpu.json", *TRAIN_STEP_FIELDS)
    ours = [r for r in step if r["side"] == "ours"]
    assert {r["case"] for r in ours} == {"mlcd_recipe", "rope_k1000", "clip",
                                        "mlcd_recipe+xla_attention", "mlcd_recipe+f32_head"}
    assert all("temporaries_gib" in r for r in ours)
    assert all("over_best_torch" in r for r in ours if r["case"] in ("mlcd_recipe", "clip"))
    assert sorted((r["case"], r["compile"]) for r in step if r["side"] == "torch") == [
        ("clip", False), ("clip", True), ("mlcd_recipe", False), ("mlcd_recipe", True)]
    for name in ("labels_gpu_jax.json", "labels_gpu_faiss.json"):
        assert rows(tmp_path / name, "K", "step", "row", "seconds", "points_per_s", "tflops",
                    "of_probe")


@pytest.mark.slow
def test_plan_table_smoke_writes_a_row_per_part(tmp_path):
    """bench/plan_table.sh (docs/planning.md's tables) on a toy config, each part whose compiler
    is installed."""
    parts = [kind for kind, module in (("tpu", "libtpu"), ("gpu", "jax_plugins.xla_cuda12"))
             if importlib.util.find_spec(module)]
    if not parts:
        pytest.skip("neither libtpu nor jax's CUDA plugin is installed (make plan-env)")
    for kind in parts:
        done = subprocess.run(["bash", "bench/plan_table.sh", kind, str(tmp_path / kind)],
                              cwd=REPO, env=env(SMOKE="1"), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        table = [line for line in done.stdout.splitlines() if line.startswith("| micro |")]
        assert len(table) == 1 and " yes |" in table[0], done.stdout[-2000:]
