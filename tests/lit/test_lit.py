"""LiT (python -m mlcd_jax.lit) as users run it: the text tower learns captions of images whose
features carry their class, the image tower stays locked, a run resumes exactly after SIGTERM, and
the text tower it writes loads in transformers."""

import json
import subprocess

import numpy as np
import pytest
from flax import nnx

from mlcd_jax.interop import weights
from mlcd_jax.models import vit
from mlcd_jax.runtime import files

from helpers import commands

LIT = ["--config=configs/lit_demo.py", "--config.log_every=1", "--config.evals.every=0"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("encoder") / "random_vit"
    weights.save_model_dir(vit.ViT(vit.vit_config("micro", image_size=32, embed_dim=16),
                                   rngs=nnx.Rngs(0)), path)
    return path


# LiT's loop, evals and protections on 2 devices: its steps (batch 256) run ~30 % faster than on 8
# (150 steps: 15.4 → 11.5 s), and the mesh is not what these tests are about (test_multihost's
# LiT runs on two processes).
DEVICES = 2


def lit(workdir, encoder, *overrides, **kw):
    return commands.run("mlcd_jax.lit", *LIT, f"--workdir={workdir}",
                        f"--config.image.model={encoder}", *overrides, devices=DEVICES, **kw)


def losses(workdir):
    return {r["step"]: r["loss"] for r in commands.records(workdir)}


@pytest.mark.slow
def test_text_tower_learns_captions_of_informative_image_features(tmp_path, encoder):
    """The image features are replaced by class directions + noise (as a good encoder's would
    be): zero-shot and retrieval must then rise far above chance; the cached features are used,
    not recomputed, and stay as they were (the image tower is locked)."""
    lit(tmp_path, encoder, "--config.total_steps=1")
    features = tmp_path / "features"
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(16, 16)))[0][:10]
    for split in ("train", "test"):
        labels = np.load(features / f"{split}.labels.npy")
        x = directions[labels] + 0.3 * rng.normal(size=(len(labels), 16))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        record = files.piece_record(features / f"{split}.npy")
        files.write_piece(features / f"{split}.npy", x, {"fingerprint": record["fingerprint"]})
    before = {s: np.load(features / f"{s}.npy") for s in ("train", "test")}
    for name in ("checkpoints", "metrics.jsonl", "evals.jsonl", "tensorboard"):
        subprocess.run(["rm", "-rf", str(tmp_path / name)], check=True)
    out = lit(tmp_path, encoder, "--config.total_steps=150", "--config.evals.every=150")
    assert "image features" not in out.stderr  # read from the cache
    last = commands.records(tmp_path, "evals.jsonl")[-1]
    assert last["zero_shot_top1"] > 0.9, last           # chance: 0.1
    assert last["image_to_text_R@5"] > 0.04 and last["text_to_image_R@5"] > 0.02, last
    curve = losses(tmp_path)
    assert curve[150] < 0.5 * curve[1]
    for split, x in before.items():
        np.testing.assert_array_equal(np.load(features / f"{split}.npy"), x)
    # The text tower, written for transformers, loads with no missing or unexpected keys.
    transformers = pytest.importorskip("transformers")
    model, info = transformers.CLIPTextModelWithProjection.from_pretrained(
        tmp_path / "text_model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (tmp_path / "text_model" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["kind"] == "clip"


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, encoder):
    steps = ["--config.total_steps=150", "--config.checkpoint_every=1000",
             "--config.loss.kind=siglip"]
    lit(tmp_path / "reference", encoder, *steps)
    interrupted = tmp_path / "interrupted"
    commands.sigterm_after("mlcd_jax.lit", *LIT, f"--workdir={interrupted}",
                           f"--config.image.model={encoder}", *steps, workdir=interrupted,
                           devices=DEVICES)
    stopped = max(losses(interrupted))
    assert 20 <= stopped < 150
    resumed = lit(interrupted, encoder, *steps)
    assert f"resuming at step {stopped}" in resumed.stdout
    assert losses(interrupted) == losses(tmp_path / "reference")  # every step, exactly


def test_config_mistakes_are_one_line(tmp_path, encoder):
    out = commands.run("mlcd_jax.lit", *LIT, f"--workdir={tmp_path}", expect=2)
    assert "config.image.model" in out.stderr and "Traceback" not in out.stderr
    out = lit(tmp_path, encoder, "--config.loss.kind=infonce", expect=2)
    assert "config.loss.kind: must be one of" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_evaluate_with_the_text_model_repeats_the_runs_own_eval(tmp_path, encoder):
    """`python -m mlcd_jax.evaluate --text_model` recomputes the test features from the encoder
    and gives the zero-shot accuracy and recall the LiT run logged (same prompts, same captions)."""
    lit(tmp_path / "lit", encoder, "--config.total_steps=20", "--config.evals.every=20")
    logged = commands.records(tmp_path / "lit", "evals.jsonl")[-1]
    prompts = [f"--prompt={p}" for p in ("a photo of a {name}.", "the digit {name}",
                                         "a handwritten {name}")]
    templates = [f"--template={t}" for t in (
        "a {size} {name} in the {place}", "the digit {name}, {size}, {place}",
        "a photo of a {size} handwritten {name} at the {place} of the canvas", "{place}: a {name}",
        "a {size} {name}", "{name}")]
    commands.run("mlcd_jax.evaluate", f"--model={encoder}", "--dataset=digits_canvas",
                 "--test_split=test", "--image_size=32", "--no-pixels",
                 f"--text_model={tmp_path / 'lit' / 'text_model'}", *prompts, *templates,
                 f"--out={tmp_path / 'eval.json'}", devices=DEVICES)
    text = json.loads((tmp_path / "eval.json").read_text())["text"]
    for key in ("zero_shot_top1", "zero_shot_top5", "image_to_text_R@5", "text_to_image_R@10"):
        assert text[key] == pytest.approx(logged[key], abs=1e-6), key


@pytest.mark.slow
def test_retrieval_only_on_captioned_web_shards(tmp_path, encoder):
    """img2dataset-style shards (image + .txt, no classes) → convert → LiT with the images' own
    captions: retrieval evals only (no class names, no zero-shot), and recall far above chance
    once the image features carry what the captions say. A damaged cached feature file is
    recomputed, not read."""
    import io
    import tarfile

    from PIL import Image
    from sklearn.datasets import load_digits

    from mlcd_jax.data import convert
    from mlcd_jax.evaluate import zero_shot

    digits = load_digits()
    n, wording = 240, ("the digit {}", "a handwritten {}", "{} written by hand")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(buf, "PNG")
            name = zero_shot.DIGIT_NAMES[digits.target[i]]
            for member, data in ((f"{i:05d}.png", buf.getvalue()),
                                 (f"{i:05d}.txt", wording[i % 3].format(name).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    convert.convert(str(tmp_path / "00000.tar"), str(tmp_path / "ar" / "web"), 100)
    data = ["--config.data.dataset=arrayrecord",
            f"--config.data.path={tmp_path / 'ar' / 'web-*.array_record'}",
            "--config.data.test_split=", "--config.data.templates=('{caption}',)",
            "--config.batch_size=64"]
    run = tmp_path / "lit"
    out = lit(run, encoder, *data, "--config.total_steps=1")
    assert "unlabelled data: retrieval evals only" in out.stdout

    # Features that carry the digit (as a good encoder's would), in the cache's order.
    features = run / "features"
    order = {"train": None, "test": None}
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(16, 16)))[0][:10]
    held_out = np.sort(np.random.default_rng(0).permutation(n)[:round(n * 0.3)])  # evaluate.run
    order["test"], order["train"] = held_out, np.setdiff1d(np.arange(n), held_out)
    for split, rows in order.items():
        x = directions[digits.target[rows]] + 0.3 * rng.normal(size=(len(rows), 16))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        record = files.piece_record(features / f"{split}.npy")
        files.write_piece(features / f"{split}.npy", x, {"fingerprint": record["fingerprint"]})
    for name in ("checkpoints", "metrics.jsonl", "evals.jsonl", "tensorboard"):
        subprocess.run(["rm", "-rf", str(run / name)], check=True)
    out = lit(run, encoder, *data, "--config.total_steps=100", "--config.evals.every=100")
    assert "image features" not in out.stderr  # read from the cache
    last = commands.records(run, "evals.jsonl")[-1]
    assert not any(k.startswith("zero_shot") for k in last), last
    # Each test image has one caption, worded as a third of the others of its digit (~7 of the
    # 72): chance R@10 ≈ 0.14; knowing the digit puts the own caption among the top ~7 (0.76 and
    # 0.81 measured).
    assert last["image_to_text_R@10"] > 0.6 and last["text_to_image_R@10"] > 0.6, last

    # A cached feature file cut short (a full disk, a killed copy) under an intact record.
    path = features / "train.npy"
    path.write_bytes(path.read_bytes()[:200])
    out = lit(run, encoder, *data, "--config.total_steps=100")
    assert "image features (train)" in out.stderr and len(np.load(path)) == len(order["train"])


@pytest.mark.slow
def test_lit_has_the_trainers_protections(tmp_path, encoder):
    """The run loop is the trainer's: a second LiT on a running LiT's workdir is refused, a
    SIGKILLed run resumes exactly, a corrupt newest checkpoint is set aside and the one before it
    resumes exactly, and a diverged run sets aside the checkpoint it ruined (exit 3, one line)."""
    import shutil
    import signal
    import time
    steps = ["--config.total_steps=120", "--config.checkpoint_every=40"]
    reference = tmp_path / "reference"
    lit(reference, encoder, *steps)
    assert commands.records(reference)[-1]["step"] == 120

    def start(workdir, *args, lines: int):
        """A LiT in the background, once its metrics.jsonl has `lines` files."""
        proc = subprocess.Popen(commands.command("mlcd_jax.lit", *LIT, f"--workdir={workdir}",
                                                 f"--config.image.model={encoder}", *args),
                                cwd=commands.REPO, env=commands.env(DEVICES),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not ((workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= lines):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        return proc

    busy = tmp_path / "busy"
    proc = start(busy, "--config.total_steps=100000", lines=1)
    try:
        second = lit(busy, encoder, *steps, expect=2)
        assert f"{busy} is in use by another trainer (pid {proc.pid}" in second.stderr
        assert proc.poll() is None  # the first one trains on
    finally:
        proc.kill()
        proc.wait()

    killed = tmp_path / "killed"
    proc = start(killed, *steps, lines=60)  # checkpoint 40 saved (and written) by then
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = lit(killed, encoder, *steps)
    assert "resuming at step 40" in resumed.stdout
    assert losses(killed) == losses(reference)  # every step, exactly

    corrupt = tmp_path / "corrupt"
    shutil.copytree(reference, corrupt)
    for f in (corrupt / "checkpoints" / "120" / "state").rglob("d/*"):
        f.unlink()  # the array data of the newest checkpoint is lost
    (corrupt / "text_model").rename(tmp_path / "text_model_before")
    again = lit(corrupt, encoder, *steps)
    assert "checkpoint 120 set aside as 120.corrupt" in again.stdout
    assert "resuming at step 80" in again.stdout
    assert losses(corrupt) == losses(reference)
    assert (corrupt / "text_model" / "model.safetensors").read_bytes() == (
        tmp_path / "text_model_before" / "model.safetensors").read_bytes()

    nan = lit(tmp_path / "nan", encoder, "--config.total_steps=40", "--config.checkpoint_every=1",
              "--config.optim.lr=1e6", "--config.optim.warmup_steps=0",
              "--config.optim.clip_norm=0", expect=3)
    diverged = max(losses(tmp_path / "nan"))
    assert not np.isfinite(losses(tmp_path / "nan")[diverged])
    ours = [line for line in nan.stderr.splitlines() if line.startswith("error:")]
    assert ours == [line for line in nan.stderr.splitlines() if "Traceback" in line or
                    line.startswith("error:")]  # one line of ours, no traceback
    assert f"the loss is nan at step {diverged}" in ours[0]
    assert f"newest good checkpoint is step {diverged - 2}" in ours[0]
    assert (tmp_path / "nan" / "checkpoints" / f"{diverged - 1}.nan").is_dir()
