"""The demo's pretraining run (`make demo` drives it): a small RoPE ViT on digits placed on a
32 × 32 canvas, labels from clustering the clean digits (the teacher), 8 simulated CPU devices.

    configs/demo.py:mlcd     multi-label (l = 4), MLCD loss
    configs/demo.py:single   single label (l = 1), UNICOM loss, same budget
"""

from mlcd_jax.config import presets, schema


def digits(source: str):
    """What every demo run shares: the demo's RoPE ViT (width 64, patch 4, a 64-d float32
    embedding), K = 64 classes all scored, 32 px digits of `source` unflipped, batch 128 for 400
    steps of AdamW at 5e-3 on 8 simulated CPU devices."""
    c = schema.base_config()
    c.model.size = "demo"
    c.model.embed_dim = 64
    c.model.dtype = "float32"
    c.head.num_classes = 64
    # K is small: every class, exactly. With batch · l = 512 labels over K = 64, the authors'
    # head.negatives = "batch" would draw every class anyway (docs/ablations.md).
    c.head.sample_ratio = 1.0
    c.data.source = source
    c.data.image_size = 32
    c.data.flip = False             # a mirrored digit is another glyph
    c.batch_size = 128
    c.total_steps = 400
    c.optim.lr = 5e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.log_every = 20
    c.checkpoint_every = 400
    return c


def get_config(arg="mlcd"):
    presets.check_arg(arg, ("mlcd", "single"), "configs/demo.py")
    c = digits("digits_canvas")
    c.head.loss = "mlcd" if arg == "mlcd" else "unicom"
    # The paper's ArcFace with the authors' straight-through gradient (the default). With the
    # exact gradient the single-label run collapses here (every embedding opposite every center,
    # pos_cos -1.0 at step 400); tests/training/test_margin.py repeats that at a smaller size.
    c.head.margin_type = "arcface"
    c.head.margin_grad = "straight_through"
    c.data.num_labels = 4 if arg == "mlcd" else 1
    c.data.crop_scale = (0.6, 1.0)
    c.data.labels = ""              # set by the demo driver
    c.evals.every = 100             # kNN on the held-out canvases while training
    c.evals.source = "digits_canvas"
    c.evals.test_split = "test"
    c.evals.probes = ("knn",)
    return c
