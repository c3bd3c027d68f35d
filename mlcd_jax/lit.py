"""LiT: a text tower trained to match a locked image encoder (Zhai et al. 2022), which gives an MLCD
encoder zero-shot classification and image–text retrieval.

    python -m mlcd_jax.lit --config=configs/lit_demo.py --workdir=DIR --config.image.model=RUN

Reads top to bottom: the image encoder (a pretraining workdir, our model dir or a transformers
dir), locked, embeds the train and test images once (cached in WORKDIR/features with a record of
the weights, images and size) → captions (templates with class names, or the data's own
{caption}s) → tokenizer (a local CLIP one, or a BPE trained on the captions, saved in
WORKDIR/tokenizer) → the text tower, its temperature (and SigLIP's bias), AdamW, one jitted step
with the contrastive loss split over the mesh (`mlcd_jax/contrastive.py`) → checkpoint or init →
loop, with periodic zero-shot and retrieval evals on the held-out images (retrieval only where
the images have no classes: captioned web data through `python -m mlcd_jax.data.convert`, or a
tfds dataset with captions). Batch `step` is a function of (seed, step), so a preempted run
(SIGTERM saves at the next step) resumes exactly. At the end the text tower is written as a
transformers CLIPTextModelWithProjection (WORKDIR/text_model).
"""

from __future__ import annotations

import functools
import pathlib
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from mlcd_jax import (
    checkpoint,
    config as config_lib,
    contrastive,
    mesh as mesh_lib,
    optim,
    reporting,
    weights,
)
from mlcd_jax.data import tokenizer as tokenizer_lib
from mlcd_jax.evaluate import features, run as eval_run, zero_shot
from mlcd_jax.interop import hf
from mlcd_jax.labels import embed, store
from mlcd_jax.models import text as text_lib

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/lit_*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, features, tokenizer.")

def image_features(c, workdir, encoder, source, name, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(normalised features, labels) of `source`, computed once: cached with a record of the
    encoder's weights, the images and the image size, and recomputed if any changed."""
    path = workdir / "features" / f"{name}.npy"
    made_by = store.digest(embed.model_fingerprint(nnx.state(encoder)), source.fingerprint(),
                           c.image.image_size)
    record = store.piece_record(path) or {}
    if record.get("fingerprint") == made_by:
        try:
            cached, labels = np.load(path), np.load(path.with_suffix(".labels.npy"))
        except (OSError, ValueError, EOFError):  # a damaged file: recomputed below
            cached = labels = None
        if (cached is not None and store.array_sha256(cached) == record.get("sha256")
                and labels.shape == (len(cached),)):
            return cached, labels
    x, y = features.extract(encoder, source, image_size=c.image.image_size,
                            batch_size=c.image.batch_size, mesh=mesh, desc=f"image features "
                            f"({name})")
    x = zero_shot.normalize(x)
    if jax.process_index() == 0:
        np.save(path.with_suffix(".labels.npy"), y)  # before the record that vouches for both
        store.write_piece(path, x, {"fingerprint": made_by})
    return x, y


def make_tokenizer(c, workdir, captions) -> tokenizer_lib.TextTokenizer:
    saved = workdir / "tokenizer"
    if c.text.tokenizer:
        return tokenizer_lib.load(c.text.tokenizer, c.text.context_length)
    if (saved / "tokenizer.json").is_file():  # a resumed run keeps its vocabulary
        return tokenizer_lib.load(saved, c.text.context_length)
    tok = tokenizer_lib.train(captions, c.text.vocab_size, c.text.context_length)
    if jax.process_index() == 0:
        tok.save(saved)
    return tok


def batch_rows(seed: int, step: int, size: int, captions_per_row: np.ndarray):
    """Rows and caption choices of batch `step`: epoch e is a seeded permutation of the rows; each
    row's caption one of its own, drawn at random."""
    n = len(captions_per_row)
    positions = (step - 1) * size + np.arange(size)
    epochs, within = positions // n, positions % n
    rows = np.empty(size, np.int64)
    for e in np.unique(epochs):
        order = np.random.default_rng([seed, int(e)]).permutation(n)
        rows[epochs == e] = order[within[epochs == e]]
    which = np.random.default_rng([seed, step, 1]).integers(0, captions_per_row[rows])
    return rows, which


def train_step(state, images, tokens, *, graphdef, tx, kind, chunk, mesh):
    def loss_fn(params):
        texts = nnx.merge(graphdef, params["text"])(tokens).embedding
        return contrastive.loss(images, texts, params["log_scale"], params["bias"], kind=kind,
                                chunk=chunk, mesh=mesh)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return ({"params": params, "opt": opt_state, "step": state["step"] + 1},
            {"loss": loss, "scale": jnp.exp(params["log_scale"]), "bias": params["bias"],
             "grad_norm": optax.global_norm(grads)})


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        lit(CONFIG.value, pathlib.Path(_WORKDIR.value).absolute())
    except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.SaveFailed) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def lit(c, workdir: pathlib.Path) -> None:
    if not c.image.model:
        raise ValueError("config.image.model: the image encoder to lock (a training workdir, a "
                         "model dir or a transformers dir) is not set")
    if c.loss.kind not in contrastive.KINDS:
        raise ValueError(f"config.loss.kind must be one of {contrastive.KINDS}, got "
                         f"{c.loss.kind!r}")
    mesh = mesh_lib.make_mesh(c.mesh)
    if c.batch_size % mesh_lib.num_batch_shards(mesh):
        raise ValueError(f"config.batch_size {c.batch_size} is not divisible by the "
                         f"{mesh_lib.num_batch_shards(mesh)} devices of the mesh")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "features").mkdir(exist_ok=True)

    # The locked image tower: every image embedded once.
    d = c.data
    train_src, test_src = eval_run.splits_of(d, "config.data.", labelled=False)
    encoder, described = weights.load_encoder(c.image.model)
    train_x, train_y = image_features(c, workdir, encoder, train_src, "train", mesh)
    test_x, test_y = image_features(c, workdir, encoder, test_src, "test", mesh)
    del encoder

    # Captions and the tokenizer. Unlabelled data (captioned web images) has retrieval only.
    labelled = (train_y >= 0).all() and (test_y >= 0).all()
    names = ()
    if labelled:
        names = zero_shot.class_names(d.dataset, train_src, d.class_names,
                                      "config.data.class_names")
        if max(train_y.max(), test_y.max()) >= len(names):
            raise ValueError(f"config.data.class_names: {len(names)} names for labels up to "
                             f"{max(train_y.max(), test_y.max())}")
    caption = functools.partial(zero_shot.captions, templates=d.templates, names=names,
                                field="config.data.templates")
    train_captions, test_captions = caption(train_src, train_y), caption(test_src, test_y)
    every_caption = [t for row in train_captions for t in row]
    tok = make_tokenizer(c, workdir, every_caption)
    for prompt in c.evals.prompts if c.evals.every and labelled else ():  # a mistake shows now
        if prompt.format(name="x") == prompt:
            raise ValueError(f"config.evals.prompts: {prompt!r} has no {{name}}")
    captions_per_row = np.array([len(row) for row in train_captions])
    first_caption = np.concatenate([[0], np.cumsum(captions_per_row)[:-1]])
    train_tokens = tok(every_caption)    # (captions, T)

    # The text tower, its temperature and bias, AdamW, the step.
    cfg = text_lib.text_config(c.text.size, vocab_size=tok.vocab_size,
                               context_length=c.text.context_length, embed_dim=train_x.shape[1],
                               eos_token_id=tok.end, dtype=c.text.dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: text_lib.TextTransformer(
        cfg, rngs=nnx.Rngs(0))))
    tx = optax.chain(
        optax.clip_by_global_norm(c.optim.clip_norm) if c.optim.clip_norm else optax.identity(),
        optax.adamw(optim.schedule(c, c.total_steps), b1=c.optim.b1, b2=c.optim.b2,
                    eps=c.optim.eps, weight_decay=c.optim.weight_decay, mask=optim.decay_mask))

    def init(key):
        tower = text_lib.TextTransformer(cfg, rngs=nnx.Rngs(key))
        params = {"text": nnx.to_pure_dict(nnx.state(tower)),
                  "log_scale": jnp.log(jnp.float32(c.loss.init_scale)),
                  "bias": jnp.float32(c.loss.init_bias if c.loss.kind == "siglip" else 0.0)}
        return {"params": params, "opt": tx.init(params), "step": jnp.int32(0)}

    replicated = mesh_lib.replicated(mesh)
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = jax.tree.map(lambda _: replicated, abstract)
    batch = mesh_lib.batch_sharding(mesh)
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, kind=c.loss.kind,
                                        chunk=c.loss.chunk or None, mesh=mesh),
                      in_shardings=(shardings, batch, batch), out_shardings=(shardings, replicated),
                      donate_argnums=0)

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=c.keep_checkpoints)
    found = ckpt.restore_newest_good(checkpoint.abstract_like(abstract, shardings))
    if found is None:
        state, start = jax.jit(init, out_shardings=shardings)(jax.random.key(c.seed)), 0
    else:
        state, data_state, start = found
        if data_state["seed"] != c.seed:
            raise ValueError(f"config.seed {c.seed} differs from the checkpoint's "
                             f"{data_state['seed']}; use the same seed or a new workdir")
    report = reporting.Reporter(workdir, total_steps=c.total_steps, batch_size=c.batch_size,
                                start_step=start)
    if report.enabled:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    report.message(f"{'resuming at step ' + str(start) if start else 'starting'}: LiT "
                   f"({c.loss.kind}) of a {c.text.size} text tower ({tok.vocab_size:,} tokens) "
                   f"on {described}, locked: {len(train_x):,} train / {len(test_x):,} test "
                   f"images, {len(train_tokens):,} train captions, {mesh.size} devices"
                   + ("" if labelled else "; unlabelled data: retrieval evals only"))

    def run_evals(step):
        report.pause_clock(step)
        tower = nnx.merge(graphdef, state["params"]["text"])
        result = zero_shot.text_evals(tower, tok, names, c.evals.prompts, test_x, test_y,
                                      test_captions)
        report.log_eval(step, result)
        report.start_clock(step)

    sigterm = []
    signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))
    try:
        for step in range(start + 1, c.total_steps + 1):
            rows, which = batch_rows(c.seed, step, c.batch_size, captions_per_row)
            images = jax.device_put(train_x[rows], batch)
            tokens = jax.device_put(train_tokens[first_caption[rows] + which], batch)
            state, metrics = step_fn(state, images, tokens)
            if step == start + 1:
                jax.block_until_ready(metrics)
                report.start_clock(step)
            stop = bool(sigterm)
            if step % c.log_every == 0 or step == c.total_steps or stop:
                values = jax.device_get(metrics)
                if not np.isfinite(values["loss"]):
                    raise FloatingPointError(f"the loss is {values['loss']} at step {step}; "
                                             "lower config.optim.lr and rerun")
                report.log(step, values)
            if stop or step % c.checkpoint_every == 0 or step == c.total_steps:
                ckpt.save(step, state, {"step": step, "seed": c.seed})
            if c.evals.every and (step % c.evals.every == 0 or step == c.total_steps) and not stop:
                run_evals(step)
            if stop:
                ckpt.wait()
                report.message(f"SIGTERM: saved step {step} to {ckpt.directory}; rerun to resume")
                return
        if report.enabled:  # the text tower, for transformers' CLIPTextModelWithProjection
            hf.save_text_model(nnx.merge(graphdef, state["params"]["text"]),
                               workdir / "text_model")
            tok.save(workdir / "text_model")
            report.message(f"text tower: {workdir / 'text_model'} (transformers "
                           "CLIPTextModelWithProjection + tokenizer.json)")
    finally:
        ckpt.close()
        report.close()


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=config_lib.parse_flags)
