"""README.md's "Your own images", run as a user runs it: its command block as the README has it
(read from README.md, not copied here), by bash, from a directory outside the checkout, on a
folder of class-labelled PNGs and a randomly initialised transformers CLIP teacher made here: the
one command (`python -m mlcd_jax.pretrain`), then the stage-by-stage path; then its Python block
(the export through transformers, the projection applied) against our encoder's own embedding.
Then the one command again (every stage finished before) and with another teacher (refused)."""

import json
import re

import numpy as np
import pytest

from helpers import commands
from helpers.images import clip_teacher, digit_folders

STAGES = ["convert", "embed", "labels", "calibrate", "train", "evaluate", "export"]


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """The fenced code blocks of README.md's `## section`: [(language, text)]."""
    text = (commands.REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", body, re.S)


@pytest.mark.slow
def test_the_readme_own_folder_block_as_written(tmp_path, monkeypatch):
    import transformers

    from mlcd_jax.interop import weights
    (shell, block), (python, snippet) = readme_blocks("Your own images")
    assert (shell, python) == ("bash", "python")
    one_command = next(line for line in block.splitlines()
                       if line.startswith("python -m mlcd_jax.pretrain"))
    manual = block.split(one_command, 1)[1]
    assert len([line for line in manual.splitlines() if line.strip()]) <= 15

    user = tmp_path / "user"  # outside the checkout: nothing there but the user's files
    digit_folders(user / "photos", images=200)
    clip_teacher(user / "clip")
    env = commands.user_env()
    result = commands.bash(block, user, env)
    assert result.returncode == 0, result.stderr[-4000:]
    said = result.stdout + result.stderr
    # No warning about a field the user never set (an inherited dataset size, a warm-up longer
    # than the run, faiss's per-clustering complaints).
    assert not re.findall(r"^(?:warning:|WARNING).*$", said, re.M), said[-4000:]

    # The one command: every stage, its table, its record, each output where the manual path
    # puts it.
    table = result.stdout.split("\nstage ", 1)[1].splitlines()[1:len(STAGES) + 1]
    assert [row.split()[0] for row in table] == STAGES, table
    record = json.loads((user / "run" / "pretrain.json").read_text())
    assert list(record["stages"]) == STAGES
    assert record["stages"]["convert"]["classes"] == 10
    assert record["stages"]["labels"]["num_centers"] == 16  # 200 images: K = max(16, N / 20)
    evaluation = json.loads((user / "run" / "train" / "eval.json").read_text())
    for r in (evaluation, evaluation["raw_pixels"]):
        assert 0 <= r["linear_probe"]["accuracy"] <= 1 and 0 <= r["knn"]["accuracy"] <= 1
    assert evaluation["test"] == 60  # 30 % of 200 held out
    # The stage-by-stage path wrote its own run, evaluation and export.
    assert json.loads((user / "run_manual" / "eval.json").read_text())["train"] == 140
    manual_model, info = transformers.MLCDVisionModel.from_pretrained(
        user / "hf_model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # The Python block, as written, in the user's directory: the export through transformers,
    # its projection applied, is the embedding our encoder gives the same pixels.
    monkeypatch.chdir(user)
    scope = {}
    exec(snippet, scope)
    embedding = scope["embedding"].detach().numpy()
    encoder, _ = weights.load_encoder(str(user / "run" / "train"))
    pixels = scope["pixels"].numpy().transpose(0, 2, 3, 1)  # NCHW → ours, NHWC
    ours = np.asarray(encoder(pixels).embedding)
    assert embedding.shape == ours.shape == (1, 64)
    np.testing.assert_allclose(embedding, ours, atol=1e-4 * np.abs(ours).max())

    # Again: nothing is redone. With another teacher: refused, naming the flag.
    again = commands.bash(one_command, user, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished before") == len(STAGES)
    other = commands.bash(one_command.replace("--teacher clip", "--teacher photos"), user, env)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"error: --workdir {user / 'run'} was made with --teacher='{user / 'clip'}', not "
        f"'{user / 'photos'}': rerun with the same flags to resume it, or choose a new --workdir"]


@pytest.mark.slow
def test_a_stage_that_fails_stops_the_command_and_a_rerun_keeps_what_finished(tmp_path):
    """A teacher dir that is not a model: convert finishes, embed stops the run with its own
    line and the stage named; the rerun skips convert."""
    user = tmp_path / "user"
    digit_folders(user / "photos", images=40)
    (user / "clip").mkdir()
    env = commands.user_env()
    command = "python -m mlcd_jax.pretrain --images photos --teacher clip --workdir run"
    for attempt in range(2):
        result = commands.bash(command, user, env)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 2 and "clip" in errors[0], result.stderr[-2000:]
        assert errors[1].startswith("error: pretrain stopped at its embed stage")
        assert "Traceback" not in result.stderr
        assert ("[1/7] convert: finished before" in result.stdout) == (attempt == 1)
    record = json.loads((user / "run" / "pretrain.json").read_text())
    assert list(record["stages"]) == ["convert"] and record["stages"]["convert"]["images"] == 40
