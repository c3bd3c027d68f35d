"""Multi-host, with real processes on 127.0.0.1 (launch/local_multiprocess.sh, gloo collectives):
2 processes × 4 devices train like 1 process × 8 (with RICE's region heads too), their checkpoint
resumes in 1 process, LiT runs as one job over 2 processes and resumes exactly after SIGTERM on
both, and `assign` split over 2 processes writes the label store of 1."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mlcd_jax.data import record_keys as keys
from mlcd_jax.labels import store
from mlcd_jax.runtime import distributed

from helpers.commands import CACHE, COMMAND_COMPILE, REPO, TRAIN_COMPILE, xla_flags

LAUNCH = REPO / "launch" / "local_multiprocess.sh"
TRAIN = [sys.executable, "-m", "mlcd_jax.train", "--config=configs/test_tiny.py",
         "--config.total_steps=4", "--config.checkpoint_every=2", "--config.log_every=1",
         "--config.head.sample_ratio=0.5"]


def clean_env(**extra):
    """This process's environment without its jax and XLA settings (the suite's compilation
    cache kept: cli.CACHE)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_")) or k in CACHE}
    return env | {"JAX_PLATFORMS": "cpu"} | extra


def run(cmd, **env):
    result = subprocess.run(cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


def losses(workdir, key="loss"):
    rows = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r[key] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["", ":regions"], ids=["image_head", "region_heads"])
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path, arg):
    """Also with RICE's region heads and Region Transformer layer (configs/test_tiny.py:regions):
    every head's loss, step by step."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    train = [a.replace("configs/test_tiny.py", "configs/test_tiny.py" + arg) for a in TRAIN]
    run(train + [f"--workdir={one}"], XLA_FLAGS=xla_flags(8, TRAIN_COMPILE))
    out = run(["bash", str(LAUNCH), "-n", "2", "-d", "4", "--logs", str(tmp_path / "logs"), "--",
               *train, f"--workdir={two}"], XLA_FLAGS=TRAIN_COMPILE)
    assert "on 8 devices" in out.stdout  # one mesh over both processes' devices
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert "step 4/4" in logs[0] and "step 4/4" not in logs[1]  # only process 0 reports
    reference = losses(one)
    assert sorted(reference) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses(two)[s] for s in range(1, 5)],
                               [reference[s] for s in range(1, 5)], rtol=1e-5)
    heads = ("objects", "ocr") if arg else ()
    for name in heads:
        key = f"{name}/loss"
        np.testing.assert_allclose([losses(two, key)[s] for s in range(1, 5)],
                                   [losses(one, key)[s] for s in range(1, 5)], rtol=1e-5)
    # The 2-process checkpoint of step 2, resumed by 1 process on 8 devices, redoes steps 3 and 4.
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    out = run(train + [f"--workdir={resumed}"],
              XLA_FLAGS=xla_flags(8, TRAIN_COMPILE))
    assert "resuming at step 2" in out.stdout
    for key in ("loss", *(f"{name}/loss" for name in heads)):
        np.testing.assert_allclose([losses(resumed, key)[s] for s in (3, 4)],
                                   [losses(one, key)[s] for s in (3, 4)], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend, devices", [("faiss", 1), ("jax", 2)])
def test_assign_split_over_two_processes_writes_the_same_store(tmp_path, backend, devices):
    """jax: the centers split over the 4 devices of both processes; process 0 has 3 shards and
    process 1 two, so process 1 makes empty mesh calls while process 0 finishes. The embeddings
    carry keys in a shuffled order: every key's labels are the float64 top-3 of its own row."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    names = [f"img/{i:05d}.jpg" for i in rng.permutation(3000)]
    store.write_embeddings(tmp_path / "emb", np.array_split(x, 5), model="random",
                           keys=np.array_split(names, 5))
    centers = store.normalize(rng.normal(size=(41, 16)).astype(np.float32))
    np.save(tmp_path / "centers.npy", centers)
    assign = [sys.executable, "-m", "mlcd_jax.labels", "assign", f"--embeddings={tmp_path / 'emb'}",
              f"--centers={tmp_path / 'centers.npy'}", "--num_labels=3", f"--backend={backend}"]
    run(assign + [f"--out={tmp_path / 'one'}"])
    run(["bash", str(LAUNCH), "-n", "2", "-d", str(devices), "--logs", str(tmp_path / "logs"),
         "--", *assign, f"--out={tmp_path / 'two'}"], XLA_FLAGS=COMMAND_COMPILE)
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert "assign (process 0)" in logs[0] and "assign (process 1)" in logs[1]
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "labels.npy"),
                                  np.load(tmp_path / "one" / "labels.npy"))
    two = store.open_label_store(tmp_path / "two")
    own = np.asarray(store.open_embeddings(tmp_path / "emb").load(0), np.float64)  # float16 kept
    rows = keys.lookup(two.keys(), keys.hashes(names[:600]))
    np.testing.assert_array_equal(rows, np.arange(600))
    top = np.argsort(-(own / np.linalg.norm(own, axis=1, keepdims=True)) @ centers.T.astype(
        np.float64), axis=1)[:, :3]
    np.testing.assert_array_equal(two.labels[rows], top)
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").glob("*.npy"))
    assert parts == [f"part_{i:05d}.npy" for i in range(5)]
    if backend == "jax":  # k-means too: every process reads its share of the sample and runs the
        clustered = {}    # Lloyd steps on the shared mesh (two levels, k-means++ seeds)
        for n, out in ((1, "all_one"), (2, "all_two")):
            command = [sys.executable, "-m", "mlcd_jax.labels", "all",
                       f"--embeddings={tmp_path / 'emb'}", "--num_centers=10", "--niter=3",
                       "--two_level=2", "--init=kmeans++", "--points_per_center=100",
                       "--num_labels=3", "--backend=jax", f"--out={tmp_path / out}"]
            run(command if n == 1 else ["bash", str(LAUNCH), "-n", "2", "-d", "2", "--", *command],
                XLA_FLAGS=COMMAND_COMPILE)
            clustered[n] = np.load(tmp_path / out / "labels.npy")
        assert (clustered[1] == clustered[2]).mean() >= 0.999


def lit_command(workdir, encoder, *args):
    return [sys.executable, "-m", "mlcd_jax.lit", "--config=configs/lit_demo.py",
            f"--workdir={workdir}", f"--config.image.model={encoder}", "--config.log_every=1",
            "--config.total_steps=60", "--config.checkpoint_every=1000", "--config.evals.every=0",
            *args]


@pytest.mark.slow
def test_lit_is_one_job_over_two_processes_and_sigterm_on_both_resumes_exactly(tmp_path):
    """LiT over 2 processes × 4 devices trains as 1 × 8 (one metrics file, written by process
    0); SIGTERM to both (as a scheduler's preemption sends) saves one step they agree on, and
    the rerun as 2 processes ends where the uninterrupted run ended."""
    import signal
    import time

    from flax import nnx

    from mlcd_jax.interop import weights
    from mlcd_jax.models import vit
    encoder = tmp_path / "encoder"
    weights.save_model_dir(vit.ViT(vit.vit_config("micro", image_size=32, embed_dim=16),
                                   rngs=nnx.Rngs(0)), encoder)
    one, two = tmp_path / "one", tmp_path / "two"
    run(lit_command(one, encoder), XLA_FLAGS=xla_flags(8))
    reference = losses(one)
    assert sorted(reference) == list(range(1, 61))

    port = subprocess.run([sys.executable, "-c", "import socket; s = socket.socket(); "
                           "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"],
                          capture_output=True, text=True).stdout.strip()
    procs = [subprocess.Popen(lit_command(two, encoder), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=clean_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                            JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                            XLA_FLAGS=xla_flags(4)))
             for i in range(2)]
    try:
        deadline = time.time() + 300
        while not ((two / "metrics.jsonl").exists() and len(losses(two)) >= 15):
            assert all(p.poll() is None for p in procs) and time.time() < deadline
            time.sleep(0.05)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    saved = int(outs[0][0].split("SIGTERM: saved step ")[1].split()[0])
    assert 15 <= saved < 60 and "SIGTERM" not in outs[1][0]  # process 0 reports
    np.testing.assert_allclose([losses(two)[s] for s in range(1, saved + 1)],
                               [reference[s] for s in range(1, saved + 1)], rtol=1e-5)

    out = run(["bash", str(LAUNCH), "-n", "2", "-d", "4", "--logs", str(tmp_path / "logs"), "--",
               *lit_command(two, encoder)], XLA_FLAGS=COMMAND_COMPILE)
    assert f"resuming at step {saved}" in out.stdout and "8 devices" in out.stdout
    np.testing.assert_allclose([losses(two)[s] for s in range(1, 61)],
                               [reference[s] for s in range(1, 61)], rtol=1e-5)


@pytest.mark.slow
def test_launcher_reports_a_failing_process(tmp_path):
    result = subprocess.run(
        ["bash", str(LAUNCH), "-n", "2", "-d", "1", "--logs", str(tmp_path), "--", sys.executable,
         "-c", "import os, sys; sys.exit(3 if os.environ['JAX_PROCESS_ID'] == '1' else 0)"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "a process failed (exit 3)" in result.stderr


def test_dry_run_prints_one_command_per_process():
    result = subprocess.run(["bash", str(LAUNCH), "-n", "3", "-p", "1234", "--dry-run", "--",
                             "python", "-m", "mlcd_jax.train", "--workdir=/tmp/x"],
                            capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 3
    for i, line in enumerate(lines):
        assert ("JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 JAX_NUM_PROCESSES=3 "
                f"JAX_PROCESS_ID={i}" in line)
        assert "python -m mlcd_jax.train --workdir=/tmp/x" in line


@pytest.mark.slow
def test_unreachable_coordinator_is_named(tmp_path):
    code = ("from mlcd_jax.runtime import distributed; "
            "distributed.initialize('127.0.0.1:9', 2, 1, timeout_s=5)")
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "could not join the job at 127.0.0.1:9 within 5 s" in result.stderr


@pytest.mark.parametrize("env, cluster", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "WARNING: could not determine hostnames, please set it"}, None),
])
def test_cluster_detection(monkeypatch, env, cluster):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.detected_cluster() == cluster


def test_partial_explicit_settings_are_an_error(monkeypatch):
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="needs all three"):
        distributed.initialize("127.0.0.1:1234", 2, None)
