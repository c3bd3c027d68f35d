"""LiT's config (`python -m mlcd_jax.lit`): every field with its documented default."""

from __future__ import annotations

import ml_collections


def lit_config() -> ml_collections.ConfigDict:
    """Defaults of a LiT run (`python -m mlcd_jax.lit`): a text tower trained against a locked
    image encoder; every `configs/lit_*.py` starts here."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = (("data", -1),)
    c.image = ml_collections.ConfigDict()
    c.image.model = ""                      # a training workdir, our model dir or transformers dir
    c.image.image_size = 224
    c.image.resolution = ""                 # "" = as the encoder was trained or exported;
                                            # "square" (image_size² crops), "squash"
                                            # (whole images to image_size²) or "native"
    c.image.max_tokens = 0                  # native: patches per image at most (0: the
                                            # encoder's budget, else (image_size / patch)²)
    c.image.min_tokens = 0                  # native: see the trainer's config.data.min_tokens
    c.image.batch_size = 256                # images embedded at a time (once: the tower is locked)
    c.text = ml_collections.ConfigDict()
    c.text.size = "B"                       # mlcd_jax.models.text.SIZES
    c.text.context_length = 77
    c.text.dtype = "float32"
    c.text.tokenizer = ""                   # a dir with tokenizer.json or vocab.json + merges.txt;
                                            # "" = a BPE trained on the captions, saved in WORKDIR
    c.text.vocab_size = 8192                # of that trained BPE
    c.text.tokenizer_images = 1_000_000     # whose captions train it (a seeded sample of the
                                            # train split when it has more)
    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "clip"                    # "clip" (softmax) or "siglip" (sigmoid)
    c.loss.init_scale = 10.0                # exp(t) at the start (the learned temperature)
    c.loss.init_bias = -10.0                # SigLIP's bias at the start
    c.loss.chunk = 0                        # text columns scored at a time; 0 = all
    # Image–text pairs, each image captioned by `templates` with its class {name}, what the
    # dataset says of it (the demo's canvases: {size}, {place}) and its own {caption}s (a folder's
    # IMAGE.txt, convert's ArrayRecord files, a tfds "caption(s)" feature); its held-out split is
    # the zero-shot and retrieval test set. Without classes (e.g. "arrayrecord" from img2dataset
    # shards, templates ("{caption}",)): retrieval only.
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "digits_canvas"        # digits_canvas, digits, folder, arrayrecord, tfds
    c.data.path = ""
    c.data.test_path = ""
    c.data.tfds_name = ""
    c.data.train_split = "train"
    c.data.test_split = ""
    c.data.test_fraction = 0.3
    c.data.class_names = ()                 # () = the dataset's own (folder names, digit names)
    c.data.templates = ("a photo of a {name}.", "{name}", "an image of the {name}.")
    c.batch_size = 256
    c.total_steps = 1000
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.end_lr_factor = 0.0
    c.optim.weight_decay = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.clip_norm = 1.0
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.profile_steps = 0                     # > 0: a jax.profiler trace of this many steps
    c.evals = ml_collections.ConfigDict()
    c.evals.every = 0                       # steps between zero-shot / retrieval evals (and
                                            # after the last); 0 = off
    c.evals.prompts = ("a photo of a {name}.", "{name}", "an image of the {name}.")  # zero-shot:
                                            # each class the average of its prompts
    return c
