"""`python -m mlcd_jax.pretrain`'s stages (mlcd_jax/pipeline/stages.py): the trainer's flags it
composes (sizes chosen where the user set none, the user's own never resized), and the regions
path end to end on images with boxes as COCO writes them."""

import json

import pytest

from mlcd_jax.pipeline import sizing, stages

from helpers import commands
from helpers.images import clip_teacher, digit_boxes


def pipeline(*overrides, resolution="square", rate=128.0, images=300):
    """A Pipeline whose earlier stages are recorded as done: `images` images, K = 16, l = 2, a
    measured `rate` images/s."""
    p = stages.Pipeline(stages.Request(images="photos", teacher="clip", workdir="/runs/r",
                                       resolution=resolution, minutes=1.0,
                                       overrides=tuple(overrides)))
    p.config_name = "cpu_small"
    p.state["stages"] = {"convert": {"images": images, "classes": 10, "regions": 0, "texts": 0},
                         "labels": {"num_centers": 16, "num_labels": 2},
                         "calibrate": {"images_per_s": rate}}
    return p


def flags_of(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args)


def test_the_trainers_flags_sized_to_the_data_and_the_budget():
    args = flags_of(pipeline().train_args(stages.pathlib.Path("/runs/r/train")))
    # 300 images: batch 128 (cpu_small's, two steps an epoch fit); a minute at 128 images/s is
    # 60 steps (25.6 epochs, under the cap of 30); warm-up 20 → 6, a tenth of the run
    assert args["config"] == "cpu_small" and args["workdir"] == "/runs/r/train"
    assert args["config.data.path"] == "/runs/r/data/train-*.array_record"
    assert args["config.data.labels"] == "/runs/r/labels"
    assert (args["config.head.num_classes"], args["config.data.num_labels"]) == ("16", "2")
    assert (args["config.batch_size"], args["config.total_steps"], args["config.epochs"]) == (
        "128", "60", "0")
    assert args["config.optim.warmup_steps"] == "6"
    assert "config.optim.lr" not in args  # the config's batch: its learning rate


def test_a_smaller_batch_scales_the_learning_rate():
    args = flags_of(pipeline(images=100).train_args(stages.pathlib.Path("/runs/r/train")))
    assert args["config.batch_size"] == "32"
    assert float(args["config.optim.lr"]) == pytest.approx(5e-3 * 0.5)  # √(32 / 128)


def test_what_the_user_set_is_never_resized():
    p = pipeline("--config.epochs=3", "--config.batch_size=64", "--config.optim.lr=1e-3",
                 "--config.head.num_classes=16")
    args = p.train_args(stages.pathlib.Path("/runs/r/train"))
    named = flags_of(args)
    # epochs given: the config's total_steps off (the trainer refuses both); the user's own flags
    # come last, as given, and none of the chosen ones contradicts them
    assert named["config.total_steps"] == "0" and named["config.epochs"] == "3"
    assert args[-4:] == ["--config.epochs=3", "--config.batch_size=64", "--config.optim.lr=1e-3",
                         "--config.head.num_classes=16"]
    assert [a for a in args[:-4] if a.split("=")[0] in (
        "--config.batch_size", "--config.optim.lr", "--config.head.num_classes",
        "--config.epochs")] == []
    assert p.schedule()[:2] == (15, 3.2)  # ceil(3 × 300 / 64) steps
    assert named["config.optim.warmup_steps"] == "1"  # a tenth of 15


def test_native_resolution_sets_the_budget_of_the_square_size():
    args = flags_of(pipeline(resolution="native").train_args(stages.pathlib.Path("/r/train")))
    assert args["config.data.resolution"] == "native"
    assert args["config.data.max_tokens"] == "64"  # (32 / 4)², cpu_small's square budget


def test_the_calibration_run_is_short_and_keeps_the_users_model():
    args = flags_of(pipeline("--config.model.depth=2").train_args(
        stages.pathlib.Path("/r/calibrate"), calibrate=True))
    assert args["config.total_steps"] == str(stages.CALIBRATION_STEPS)
    assert args["config.model.depth"] == "2"  # measured on the model that will train


@pytest.mark.slow
def test_regions_from_coco_json_add_the_region_stage_and_head(tmp_path):
    user = tmp_path / "user"
    instances = digit_boxes(user / "coco", images=60)
    clip_teacher(user / "clip")
    command = (f"python -m mlcd_jax.pretrain --images coco/images --regions {instances.name} "
               "--teacher clip --workdir run --config.total_steps=6")
    result = commands.bash(command.replace(instances.name, "coco/instances.json"), user,
                           commands.user_env())
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((user / "run" / "pretrain.json").read_text())
    # total_steps given: no calibration run
    assert list(record["stages"]) == ["convert", "embed", "labels", "region labels", "train",
                                      "evaluate", "export"]
    assert record["stages"]["convert"]["regions"] == 120
    assert record["stages"]["region labels"]["region_centers"] == sizing.num_centers(120)
    assert "--config=rice:cpu_small,objects" in result.stdout  # no texts: the object head alone
    assert "objects: regions by key (120 of 120 object regions found" in result.stdout
    evaluation = json.loads((user / "run" / "train" / "eval.json").read_text())
    assert len(evaluation["regions"]["classes"]) == 10  # COCO's categories
    assert "region_layer" in evaluation["regions"]
    assert (user / "run" / "hf_model" / "region_layer.safetensors").is_file()
