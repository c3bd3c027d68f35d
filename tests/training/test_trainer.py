"""The trainer, run as users run it: `python -m mlcd_jax.train` in a subprocess on simulated
devices. Assertions read what it wrote (metrics.jsonl, evals.jsonl, checkpoints) and, for what a
person is told, its one-line messages."""

import json
import pathlib
import re
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mlcd_jax.config import schema as config_lib
from mlcd_jax.runtime import checkpoint, mesh as mesh_lib
from mlcd_jax.training import validation

from helpers.commands import (
    REPO,
    TRAIN_COMPILE,
    env,
    losses,
    records,
    run,
    sigterm_after,
    train,
    train_args,
)

slow = pytest.mark.slow  # runs the trainer in a subprocess


def command(workdir, *overrides):
    return [sys.executable, "-m", "mlcd_jax.train", *train_args(workdir, *overrides)]


def final_state(workdir, step):
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")


@slow
def test_tiny_trains_and_loss_falls(tmp_path):
    train(tmp_path, "--config.log_every=1", "--config.profile_steps=2")
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 41))
    first, last = (np.mean([curve[s] for s in range(1, 4)]),
                   np.mean([curve[s] for s in range(38, 41)]))
    assert last < 0.8 * first, (first, last)
    assert all(r["images_per_s"] > 0 and 0 <= r["input_wait"] <= 1  # timed after the first step
               for r in records(tmp_path)[1:])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["size"] == "micro" and config["total_steps"] == 40
    assert list((tmp_path / "tensorboard").iterdir())
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").steps() == [20, 30, 40]
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))  # config.profile_steps


@slow
def test_unicom_loss_trains(tmp_path):
    train(tmp_path, "--config.head.loss=unicom", "--config.total_steps=15", "--config.log_every=5")
    curve = losses(tmp_path)
    assert curve[15] < curve[5]


@slow
@pytest.mark.parametrize("head", [
    [], ["--config.head.center_update=sparse", "--config.head.negatives=batch",
         "--config.head.sample_ratio=0.1"]], ids=["dense", "sparse_batch"])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, head):
    """Exact resume, and on another device count (the centers' padding rows, and with sparse
    updates their per-row moments and counts, resized)."""
    steps = ["--config.total_steps=120", "--config.log_every=1", "--config.checkpoint_every=1000",
             *head]
    train(tmp_path / "reference", *steps)

    interrupted = tmp_path / "interrupted"
    sigterm_after("mlcd_jax.train", *train_args(interrupted, *steps), workdir=interrupted)
    stopped_at = checkpoint.Checkpointer(interrupted / "checkpoints").latest_step()
    assert 20 <= stopped_at < 120  # it really stopped early

    resumed = train(interrupted, *steps)
    assert f"resuming at step {stopped_at}" in resumed.stdout
    assert losses(interrupted) == losses(tmp_path / "reference")  # every step, exactly
    a, b = final_state(interrupted, 120), final_state(tmp_path / "reference", 120)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

    # The same checkpoint resumes on 4 devices (another mesh) and trains on.
    more = train(interrupted, "--config.total_steps=125", "--config.log_every=1", *head,
                 devices=4)
    assert "resuming at step 120" in more.stdout and "{'data': 4}" in more.stdout
    assert all(np.isfinite(losses(interrupted)[s]) for s in range(121, 126))


def test_checkpoint_restores_on_fewer_devices(devices, tmp_path):
    eight = mesh_lib.make_mesh([("data", -1)], devices)
    four = mesh_lib.make_mesh([("data", -1)], devices[:4])
    rows = np.arange(24 * 6, dtype=np.float32).reshape(24, 6)
    state = {"centers": jax.device_put(rows, mesh_lib.class_sharding(eight)),
             "step": jax.device_put(np.int32(7), mesh_lib.replicated(eight))}
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(7, state, {"step": 7, "seed": 0})
    ckpt.wait()
    shardings = {"centers": mesh_lib.class_sharding(four), "step": mesh_lib.replicated(four)}
    restored, data = ckpt.restore(checkpoint.abstract_like(state, shardings))
    ckpt.close()
    np.testing.assert_array_equal(restored["centers"], rows)
    assert {s.data.shape for s in restored["centers"].addressable_shards} == {(6, 6)}
    assert len(restored["centers"].sharding.device_set) == 4
    assert data == {"step": 7, "seed": 0}


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 60, "config.batch_size: the micro-batch 60 .* not divisible by the 8 batch"),
    ("grad_accum", 3, "config.grad_accum: must divide batch_size 64"),
    ("mesh", [("data", 3), ("model", -1)], "does not divide the 8 devices"),
    ("epochs", 2.0, "set exactly one of config.total_steps and config.epochs"),
    ("head.loss", "arcface", "config.head.loss: must be one of"),
    ("model.size", "B/8", "unknown ViT size 'B/8'"),
    ("data.source", "laion", "config.data.source: must be one of"),
    ("evals.every", -1, "config.evals.every: must be ≥ 0"),
    ("head.chunk", -1, "config.head.chunk: must be ≥ 0"),
    ("evals", {"every": 10, "dataset": "synthetic"}, "config.evals.source: must be one of"),
    ("evals", {"every": 10, "probes": ("knn", "svm")}, "config.evals.probes: must be a non-empty"),
])
def test_config_validation_names_field_and_fix(field, value, message):
    from mlcd_jax.config.presets import test_tiny
    c = test_tiny.get_config()
    if isinstance(value, dict):
        c[field].update(value)
    else:
        parent, _, name = field.rpartition(".")
        setattr(c[parent] if parent else c, name, value)
    with pytest.raises(ValueError, match=message):
        validation.validate(c, 8)


def test_paper_recipes_are_one_file_with_a_variant():
    from mlcd_jax.config.presets import mlcd_laion400m
    for variant, lr, width in (("B/32", 5e-4, 512), ("B/16", 5e-4, 512), ("L/14", 4e-4, 768)):
        c = mlcd_laion400m.get_config(variant)
        assert (c.model.size, c.optim.lr, c.model.embed_dim) == (variant, lr, width)
        assert (c.head.num_classes, c.data.num_labels, c.batch_size) == (1_000_000, 8, 32_768)
        validation.validate(c, 8)
    with pytest.raises(ValueError, match="mlcd_laion400m.py:B/8: unknown config argument"):
        mlcd_laion400m.get_config("B/8")


def test_epochs_give_total_steps():
    c = config_lib.base_config()
    c.epochs, c.data.num_examples, c.batch_size = 2.5, 1000, 64
    assert config_lib.total_steps(c) == 40  # ceil(2.5 × 1000 / 64)


@slow
def test_nan_sets_aside_the_checkpoints_it_ruined_and_resumes_from_a_good_one(tmp_path):
    """lr 3e3 diverges at step 8. The state saved at step 7 is what produced the NaN loss of step
    8 (a step's loss is computed before its update), so checkpoint 7 must not count as good: it is
    set aside, and a rerun with a sane lr resumes from 6 with finite losses."""
    result = train(tmp_path, "--config.optim.lr=3e3", "--config.optim.warmup_steps=30",
                   "--config.log_every=1", "--config.checkpoint_every=1", expect=3)
    nan_step = max(losses(tmp_path))
    assert not np.isfinite(losses(tmp_path)[nan_step]) and nan_step > 3
    # One line of ours (a library's log line may come too: orbax warns of a slow save under load).
    ours = [line for line in result.stderr.splitlines() if not re.match(r"[IWEF]\d{4} ", line)]
    assert len(ours) == 1 and f"the loss is nan at step {nan_step}" in ours[0], result.stderr
    assert f"newest good checkpoint is step {nan_step - 2}" in result.stderr
    assert f"checkpoint {nan_step - 1} set aside as {nan_step - 1}.nan" in result.stdout
    assert (tmp_path / "checkpoints" / f"{nan_step - 1}.nan").is_dir()
    kept = checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step()
    assert kept == nan_step - 2 and np.isfinite(losses(tmp_path)[kept + 1])  # proven good

    resumed = train(tmp_path, "--config.optim.lr=1e-3", f"--config.total_steps={nan_step + 2}",
                    "--config.log_every=1")
    assert f"resuming at step {kept}" in resumed.stdout
    assert all(np.isfinite(losses(tmp_path)[s]) for s in range(kept + 1, nan_step + 3))

    # A run that diverges before any checkpoint says so (it used to say "step None").
    early = train(tmp_path / "early", "--config.optim.lr=3e3", "--config.optim.warmup_steps=0",
                  "--config.checkpoint_every=20", expect=3)
    assert "no good checkpoint was saved before it" in early.stderr


@slow
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path):
    steps = ["--config.total_steps=10", "--config.checkpoint_every=5", "--config.log_every=1"]
    train(tmp_path, *steps)
    uninterrupted = losses(tmp_path)
    for f in (tmp_path / "checkpoints" / "10" / "state").rglob("d/*"):
        f.unlink()  # the array data of the newest checkpoint is lost
    result = train(tmp_path, *steps)
    assert "checkpoint 10 set aside as 10.corrupt" in result.stdout
    assert "resuming at step 5" in result.stdout
    assert losses(tmp_path) == uninterrupted  # steps 6-10 redone exactly
    assert (tmp_path / "checkpoints" / "10.corrupt").is_dir()  # kept, for a look


@slow
def test_torn_metrics_line_and_failing_logs_do_not_stop_training(tmp_path):
    train(tmp_path, "--config.total_steps=10")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "lo')  # a kill or a full disk mid-write
    result = train(tmp_path, "--config.total_steps=15")
    assert "resuming at step 10" in result.stdout
    assert sorted(losses(tmp_path)) == [5, 10, 15]


@slow
def test_second_trainer_on_a_workdir_is_refused(tmp_path):
    first = subprocess.Popen(command(tmp_path, "--config.total_steps=100000",
                                     "--config.log_every=1"),
                             cwd=REPO, env=env(compile=TRAIN_COMPILE), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not ((tmp_path / "metrics.jsonl").exists() and losses(tmp_path)):
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.1)
        second = train(tmp_path, expect=2)
        assert f"{tmp_path} is in use by another trainer (pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait()
    train(tmp_path, "--config.total_steps=2")  # a killed trainer leaves no lock behind


@slow
def test_failed_save_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    """A file-size limit (20 KiB, SIGXFSZ ignored) makes every larger write fail, as a full disk
    does; it used to print ~2,400 lines of orbax and asyncio tracebacks. The suite's compilation
    cache is read but not written: writing a new program there would fail too, and jax's warning
    of it would depend on which tests ran before. Under `make coverage` the command is not
    measured: coverage could not write its data file under the limit either."""
    limited = " ".join(command(tmp_path))
    environ = {k: v for k, v in env(compile=TRAIN_COMPILE).items()
               if not k.startswith("COVERAGE_PROCESS_")}
    result = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 20; exec {limited}"],
                            cwd=REPO, env=environ | {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
                                                     "1e9"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: saving checkpoint 10 to"), lines[:5]
    assert "File too large" in lines[0] and "resumes from the start" in lines[0]


@slow
def test_trainer_mistakes_are_one_line_naming_the_field(tmp_path):
    cases = [
        (["--config.head.sample_rato=0.2"], "--config.head.sample_rato: config has no field "
                                             "'sample_rato'; did you mean 'sample_ratio'?"),
        (["--config.batch_size=60"], "config.batch_size: the micro-batch 60"),
        (["--config.data.source=folder"], "config.data.path is empty: set it to the folder"),
        (["--config.total_steps=0", "--config.epochs=1", "--config.data.num_examples=0"],
         "config.epochs: the epoch length is unknown"),
    ]
    for args, message in cases:
        result = train(tmp_path / "w", *args, expect=2)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, (message, result.stderr)
    for config, message in (("configs/nope.py", "--config=configs/nope.py: no such config file or "
                                               "preset; the presets: cpu_small, demo"),
                            ("configs/demo.py:mlcdd", "configs/demo.py:mlcdd: unknown config "
                                                      "argument; allowed: :mlcd, :single")):
        result = train(tmp_path / "w", config=config, expect=2)
        assert result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr


@slow
def test_epochs_count_the_data_and_unreadable_images_are_named(tmp_path):
    """A folder of 101 files, one of them empty: 1 epoch at batch 32 is ceil(101 / 32) = 4 steps
    (not data.num_examples), the empty file is named on the console, and the 5-step warm-up
    longer than the run is said."""
    from PIL import Image
    for i in range(100):
        folder = tmp_path / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), i * 2, np.uint8)).save(folder / f"{i:03d}.png")
    (tmp_path / "images" / "a" / "bad.jpg").write_bytes(b"")
    result = train(tmp_path / "run", "--config.data.source=folder",
                   f"--config.data.path={tmp_path / 'images'}", "--config.head.num_classes=2",
                   "--config.data.num_labels=1", "--config.total_steps=0", "--config.epochs=1",
                   "--config.batch_size=32", "--config.log_every=1",
                   "--config.data.num_examples=1000000")
    assert ("4 steps on 8 devices" in result.stdout
            and sorted(losses(tmp_path / "run")) == [1, 2, 3, 4])
    assert f"skipped an unreadable image: {tmp_path / 'images' / 'a' / 'bad.jpg'}" in result.stdout
    assert "warmup_steps 5 is not shorter than this run's 4 steps" in result.stdout
    assert "config.data.num_examples 1,000,000 is ignored: the data has 101" in result.stdout


@slow
def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """With every class scored (r = 1) the loss is a mean over samples, so 2 micro-batches of 32
    give the same steps as one batch of 64."""
    common = ["--config.total_steps=3", "--config.log_every=1", "--config.head.sample_ratio=1.0"]
    train(tmp_path / "one", *common)
    train(tmp_path / "two", *common, "--config.grad_accum=2")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-5)


@slow
def test_compile_only_allocates_nothing_and_reports_memory(tmp_path):
    result = train(tmp_path, "--compile_only")
    assert "compiled: 40 steps on 8 devices" in result.stdout and "temporaries" in result.stdout
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoint_of_another_model_is_a_clear_error(devices, tmp_path):
    mesh = mesh_lib.make_mesh([("data", -1)], devices)
    state = {"encoder": {"kernel": jax.device_put(np.ones((4, 8), np.float32),
                                                  mesh_lib.replicated(mesh))}}
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state, {"step": 1, "seed": 0})
    ckpt.wait()
    wrong = {"encoder": {"kernel": jax.ShapeDtypeStruct((4, 16), np.float32,
                                                        sharding=mesh_lib.replicated(mesh))}}
    with pytest.raises(ValueError, match=r"\['encoder'\]\['kernel'\] has shape \(4, 8\) but this "
                                         r"config needs \(4, 16\)"):
        ckpt.restore(wrong)
    ckpt.close()


@slow
def test_init_from_an_imported_transformers_model(tmp_path):
    """Continue pretraining from released weights: transformers MLCD → our model dir → trainer."""
    import transformers

    from mlcd_jax.interop import weights
    from mlcd_jax.interop.hf import mapping as hf
    config = transformers.MLCDVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           image_size=16, patch_size=4)
    transformers.MLCDVisionModel(config).save_pretrained(tmp_path / "hf")
    model = hf.load_vision_model(tmp_path / "hf")
    weights.save_model_dir(model, tmp_path / "ours")
    result = train(tmp_path / "run", f"--config.model.init_from={tmp_path / 'ours'}",
                   "--config.total_steps=2", "--config.checkpoint_every=1")
    # 23 arrays from the import; the projection (not in MLCDVisionModel) is newly initialized
    assert (f"encoder: rope ViT micro width 32 depth 2 heads 2 mlp_dim 64 patch 4, gelu, no "
            f"projection: 23 of 24 parameter arrays from {tmp_path / 'ours'}; newly initialized: "
            "['projection']['kernel'] (not in the checkpoint)") in result.stdout
    with ocp.StandardCheckpointer() as ckpt:  # step 1 has moved them only by one small update
        first = ckpt.restore(tmp_path / "run" / "checkpoints" / "1" / "state")
    want = nnx.to_pure_dict(nnx.state(model))["class_embedding"]
    np.testing.assert_allclose(first["params"]["encoder"]["class_embedding"], want, atol=1e-2)

    wrong = train(tmp_path / "run2", f"--config.model.init_from={tmp_path / 'ours'}",
                  "--config.model.size=tiny", expect=2)
    assert "config.model.size: tiny (width 64 depth 2 heads 4 mlp_dim 128 patch 8) on the " \
        "command line contradicts config.model.init_from" in wrong.stderr


@slow
def test_periodic_evals_match_the_standalone_evaluator(tmp_path):
    train(tmp_path, "--config.total_steps=6", "--config.evals.every=4",
          "--config.evals.dataset=digits")
    evals = records(tmp_path, "evals.jsonl")
    assert [e["step"] for e in evals] == [4, 6]  # every 4 steps, and after the last
    # The same checkpoint through `python -m mlcd_jax.evaluate`: same splits, same sharded
    # features, same probes, compiled as the trainer's were, so the same accuracies.
    run("mlcd_jax.evaluate", f"--model={tmp_path}", "--step=6", "--dataset=digits",
        f"--out={tmp_path / 'e.json'}", "--no-pixels", compile=TRAIN_COMPILE)
    standalone = json.loads((tmp_path / "e.json").read_text())
    assert "step 6" in standalone["model"]
    for probe in ("knn", "linear_probe"):
        assert standalone[probe]["accuracy"] == evals[1][probe], probe
