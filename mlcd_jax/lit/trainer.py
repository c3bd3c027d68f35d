"""LiT: a text tower trained to match a locked image encoder (Zhai et al. 2022), which gives an MLCD
encoder zero-shot classification and image–text retrieval (`python -m mlcd_jax.lit`, its flags in
`__main__.py`).

`run` reads top to bottom: the image encoder (a pretraining workdir, our model dir or a transformers
dir), locked, embeds the train and test images once (cached in WORKDIR/features with a record of
the weights, images and size) → captions (templates with class names, or the data's own
{caption}s) → tokenizer (a local CLIP one, or a BPE trained on the captions, saved in
WORKDIR/tokenizer) → the text tower, its temperature (and SigLIP's bias), AdamW, one jitted step
with the contrastive loss split over the mesh (`mlcd_jax/lit/contrastive.py`) → checkpoint or init →
loop, with periodic zero-shot and retrieval evals on the held-out images (retrieval only where
the images have no classes: captioned web data through `python -m mlcd_jax.data.convert`, or a
tfds dataset with captions). Batch `step` is a function of (seed, step). The run loop is the
trainer's (`loop.py`): one multi-host job over every process's devices, the workdir lock,
checkpoints proven by a later finite loss, a corrupt one set aside, SIGTERM saving at a step every
process agrees on; a rerun resumes exactly. At the end the text tower is written as a
transformers CLIPTextModelWithProjection (WORKDIR/text_model).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from mlcd_jax.config import schema
from mlcd_jax.data import sources, tokenizer as tokenizer_lib
from mlcd_jax.evaluate import features, run as eval_run, zero_shot
from mlcd_jax.interop import weights
from mlcd_jax.interop.hf import mapping as hf
from mlcd_jax.labels import embed, store
from mlcd_jax.lit import contrastive
from mlcd_jax.models import text as text_lib
from mlcd_jax.runtime import checkpoint, distributed, files, mesh as mesh_lib
from mlcd_jax.runtime.errors import UserError
from mlcd_jax.training import loop, optim


def image_features(c, workdir, encoder, source, name, mesh, size: int, native=None):
    """(normalised features, labels, the records they are) of `source`'s readable images, the
    records as a Subset of `source` (row i of the features is its record i: captions are read
    from it, so an unreadable image left out moves no caption onto another), memory-mapped from
    WORKDIR/features: computed once, streamed to disk, with a record of the encoder's weights, the
    images and the image size; recomputed if any changed or the file does not read back whole.
    Memory holds a batch, not the split: web data far larger than host memory works."""
    path = workdir / "features" / f"{name}.npy"
    made_by = files.digest(embed.model_fingerprint(nnx.state(encoder)), source.fingerprint(),
                           size, *([native.describe()] if native else []))
    # Its record, checksum and labels and records beside it must all agree (a damaged file, or
    # one made by other weights, images or size: recomputed below).
    whole = files.fresh_piece(path, made_by, verify_sha256=True,
                              companions=(".labels.npy", ".records.npy")) is not None
    if not all(distributed.gather_json(whole)):  # every process, or none: extract is collective
        first = jax.process_index() == 0
        if first:
            path.with_suffix(".json").unlink(missing_ok=True)  # no record vouches while it fills
        features.extract_to(encoder, source, path, image_size=size,
                            batch_size=c.image.batch_size, mesh=mesh,
                            desc=f"image features ({name})", rows=store.normalize,
                            write=first, native=native)
        if first:
            files.record_piece(path, {"fingerprint": made_by})
        distributed.barrier(f"LiT features ({name})")
    return (np.load(path, mmap_mode="r"), np.load(path.with_suffix(".labels.npy"), mmap_mode="r"),
            sources.Subset(source, files.Mapped(path.with_suffix(".records.npy"))))


def caption_counts(c, workdir, source, labels, names, fill) -> np.ndarray:
    """Each train image's number of captions (uint16, memory-mapped), made in one pass over the
    split that also checks every image's captions can be made (a mistake names the image now,
    not mid-run), cached in WORKDIR/features with a record of the images, templates and names."""
    path = workdir / "features" / "train.captions.npy"
    made_by = files.digest(source.fingerprint(), list(c.data.templates), list(names))
    if files.fresh_piece(path, made_by) is not None:
        counts = np.load(path, mmap_mode="r")
        if len(counts) == len(source):
            return counts
    counts = np.zeros(len(source), np.uint16)
    for i in tqdm(range(len(source)), desc="captions (train)", unit="img",
                  disable=jax.process_index() != 0 or len(source) < 100_000):
        counts[i] = len(fill(i, int(labels[i])))
    if jax.process_index() == 0:
        files.write_piece(path, counts, {"fingerprint": made_by})
    return counts


def make_tokenizer(c, workdir, texts) -> tokenizer_lib.TextTokenizer:
    """The configured tokenizer, the one this run trained before, or a BPE trained on `texts()`
    (called only then)."""
    saved = workdir / "tokenizer"
    if c.text.tokenizer:
        return tokenizer_lib.load(c.text.tokenizer, c.text.context_length)
    # A resumed run keeps its vocabulary (process 0's view decides: every process must agree).
    if distributed.gather_json((saved / "tokenizer.json").is_file())[0]:
        return tokenizer_lib.load(saved, c.text.context_length)
    tok = tokenizer_lib.train(texts(), c.text.vocab_size, c.text.context_length)  # the same in
    if jax.process_index() == 0:                                                 # every process
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


class CaptionBatches:
    """LiT's batches (`loop.Inputs`): (image features, caption tokens) of batch `step`, a function
    of (seed, step) alone, so the step is the whole state. Each process reads, captions and
    tokenizes only the rows its own devices take (the features memory-mapped, the captions one
    image at a time)."""

    def __init__(self, c, features, fill, labels, counts, tok, sharding, start: int):
        self.c, self.features, self.fill, self.labels = c, features, fill, labels
        self.counts, self.tok, self.sharding, self.step = counts, tok, sharding, start

    def next(self, in_flight):
        self.step += 1
        rows, which = batch_rows(self.c.seed, self.step, self.c.batch_size, self.counts)

        def texts(index):
            return self.tok([self.fill(int(r), int(self.labels[r]))[int(w)]
                             for r, w in zip(rows[index], which[index])])

        batch = self.c.batch_size
        images = jax.make_array_from_callback(
            (batch, self.features.shape[1]), self.sharding,
            lambda index: np.asarray(self.features[rows[index[0]]]))
        tokens = jax.make_array_from_callback(
            (batch, self.c.text.context_length), self.sharding, lambda index: texts(index[0]))
        return (images, tokens), None

    def get_state(self):
        return {"step": self.step}

    def log_values(self):
        return {}

    def messages(self):
        return []


def text_step(state, batch, *, graphdef, tx, kind, chunk, mesh):
    """One optimizer step of the text tower, its temperature and bias, against locked image
    features."""
    images, tokens = batch

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


def host_copy(tree):
    """A replicated tree on one of this host's devices (a multi-host array is not readable
    whole, nor usable beside this host's own arrays)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data, tree)


def run(c, workdir, *, multihost=(None, None, None)) -> None:
    """LiT of config `c` in `workdir` (resuming from its newest good checkpoint); `multihost`:
    (coordinator, process count, process id) where not auto-detected."""
    loop.join(*multihost)
    workdir = pathlib.Path(workdir).absolute()
    c = schema.upgrade(c, schema.LIT)
    schema.check(c, schema.LIT)
    if not c.data.source:
        raise UserError("config.data.source: the image-text pairs are not set: one of "
                        f"{schema.LABELLED} (e.g. folder with "
                        "config.data.path)")
    if not c.image.model:
        raise UserError("config.image.model: the image encoder to lock (a training workdir, a "
                        "model dir or a transformers dir) is not set")
    mesh = mesh_lib.make_mesh(c.mesh)
    if c.batch_size % mesh_lib.num_batch_shards(mesh):
        raise UserError(f"config.batch_size {c.batch_size} is not divisible by the "
                        f"{mesh_lib.num_batch_shards(mesh)} devices of the mesh")
    with loop.Run(c, workdir) as run:  # the workdir locked, its checkpoints opened
        (workdir / "features").mkdir(exist_ok=True)

        # The locked image tower: every image embedded once.
        d = c.data
        train_src, test_src = eval_run.splits_of(d, "config.data.", labelled=False)
        encoder, described = weights.load_encoder(c.image.model)
        native = weights.sizing(c.image.model, encoder, c.image.resolution,
                                c.image.max_tokens, c.image.min_tokens,
                                c.image.image_size, flag="config.image.")  # None: square crops
        size = weights.image_side(c.image.model, encoder, c.image.image_size, native,
                                  flag="config.image.")
        described += f" ({native or f'{size}² crops'})"
        # Row i of the features is record i of train_rows / test_rows: captions follow it.
        train_x, train_y, train_rows = image_features(c, workdir, encoder, train_src, "train",
                                                      mesh, size, native)
        test_x, test_y, test_rows = image_features(c, workdir, encoder, test_src, "test", mesh,
                                                   size, native)
        del encoder

        # Captions and the tokenizer. Unlabelled data (captioned web images): retrieval only.
        labelled = (train_y >= 0).all() and (test_y >= 0).all()
        names = ()
        if labelled:
            names = zero_shot.class_names(d.source, train_src, d.class_names,
                                          "config.data.class_names")
            if max(train_y.max(), test_y.max()) >= len(names):
                raise UserError(f"config.data.class_names: {len(names)} names for labels up to "
                                f"{max(train_y.max(), test_y.max())}")
        zero_shot.check_templates(train_rows, d.templates, "config.data.templates")
        fill = functools.partial(zero_shot.row_captions, train_rows, templates=d.templates,
                                 names=names, field="config.data.templates")
        counts = caption_counts(c, workdir, train_rows, train_y, names, fill)
        test_captions = zero_shot.captions(test_rows, test_y, templates=d.templates, names=names,
                                           field="config.data.templates")

        def tokenizer_texts():  # every caption of (a seeded sample of) the train images
            rows = np.arange(len(train_rows))
            if len(rows) > c.text.tokenizer_images:
                rows = np.sort(np.random.default_rng(c.seed).choice(
                    rows, c.text.tokenizer_images, replace=False))
            return [t for i in rows for t in fill(int(i), int(train_y[i]))]

        tok = make_tokenizer(c, workdir, tokenizer_texts)
        for prompt in c.evals.prompts if c.evals.every and labelled else ():  # a mistake: now
            if prompt.format(name="x") == prompt:
                raise UserError(f"config.evals.prompts: {prompt!r} has no {{name}}")

        # The text tower, its temperature and bias, the optimizer, the step.
        cfg = text_lib.text_config(c.text.size, vocab_size=tok.vocab_size,
                                   context_length=c.text.context_length,
                                   embed_dim=train_x.shape[1], eos_token_id=tok.end,
                                   dtype=c.text.dtype)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: text_lib.TextTransformer(
            cfg, rngs=nnx.Rngs(0))))
        tx = optim.make_optimizer(c.optim, c.total_steps)

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
        step_fn = jax.jit(functools.partial(text_step, graphdef=graphdef, tx=tx,
                                            kind=c.loss.kind, chunk=c.loss.chunk or None,
                                            mesh=mesh),
                          in_shardings=(shardings, (batch, batch)),
                          out_shardings=(shardings, replicated), donate_argnums=0)

        found = run.restore(checkpoint.abstract_like(abstract, shardings))
        state = (jax.jit(init, out_shardings=shardings)(jax.random.key(c.seed)) if found is None
                 else found[0])
        run.begin(c.total_steps, f"LiT ({c.loss.kind}) of a {c.text.size} text tower "
                  f"({tok.vocab_size:,} tokens) on {described}, locked: {len(train_x):,} train / "
                  f"{len(test_x):,} test images, {int(counts.sum()):,} train captions, "
                  f"{mesh.size} devices"
                  + ("" if labelled else "; unlabelled data: retrieval evals only"))

        def evaluate(step, state):  # on each host, from its copy of the replicated tower
            tower = nnx.merge(graphdef, host_copy(state["params"]["text"]))
            return zero_shot.text_evals(tower, tok, names, c.evals.prompts, test_x, test_y,
                                        test_captions)

        inputs = CaptionBatches(c, train_x, fill, train_y, counts, tok, batch, run.start)
        state, preempted = run.steps(state, step_fn, inputs, evaluate=evaluate)
        if not preempted and run.report.enabled:  # for transformers' CLIPTextModelWithProjection
            hf.save_text_model(nnx.merge(graphdef, host_copy(state["params"]["text"])),
                               workdir / "text_model")
            tok.save(workdir / "text_model")
            run.report.message(f"text tower: {workdir / 'text_model'} (transformers "
                               "CLIPTextModelWithProjection + tokenizer.json)")
