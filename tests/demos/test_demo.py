"""The demo (README command 1), shortened to a few steps of the micro ViT: every stage runs and
results.json has the documented shape. The demo's own model and numbers are `make demo`'s (CI runs
it before the suite; README.md has its numbers); the micro ViT takes this test 80 → 66 s."""

import json

import pytest
from PIL import Image

from helpers import commands

ENCODERS = {"raw_pixels", "random_init", "single_label", "mlcd", "teacher"}


@pytest.mark.slow
def test_demo_end_to_end_shortened(tmp_path):
    result = commands.run("mlcd_jax.demo", f"--workdir={tmp_path}",
                          "--override=--config.total_steps=6", "--override=--config.evals.every=3",
                          "--override=--config.model.size=micro",
                          "--lit_override=--config.total_steps=4",
                          "--lit_override=--config.evals.every=2", timeout=900)
    out = json.loads((tmp_path / "results.json").read_text())
    assert set(out) == {"linear_probe", "knn", "zero_shot", "retrieval", "wall_s"}
    for probe in ("linear_probe", "knn"):
        assert set(out[probe]) == ENCODERS
    assert set(out["zero_shot"]) == set(out["retrieval"]) == {"random_init", "single_label",
                                                              "mlcd"}
    for name in ("random_init", "single_label", "mlcd"):
        assert 0 <= out["zero_shot"][name] <= 1
        assert set(out["retrieval"][name]) == {"image_to_text_R@1", "text_to_image_R@1"}
        steps = [json.loads(l)["step"]
                 for l in (tmp_path / f"lit_{name}" / "evals.jsonl").read_text().splitlines()]
        assert steps == [2, 4]
    # The teacher (clean digits) is near-perfect; raw canvases are weak: the task is as designed.
    assert out["linear_probe"]["teacher"] > 0.9 and out["linear_probe"]["raw_pixels"] < 0.4
    for kind in ("mlcd", "single"):
        steps = [json.loads(l)["step"]
                 for l in (tmp_path / kind / "evals.jsonl").read_text().splitlines()]
        assert steps == [3, 6]
    for png in ("loss.png", "cosine.png"):
        assert Image.open(tmp_path / png).size[0] > 100
    labels = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert labels["num_labels"] == 4 and labels["num_classes"] == 64
    assert "mlcd" in result.stdout and "teacher" in result.stdout
