"""Trains in seconds on 8 simulated CPU devices: a micro RoPE ViT, K = 60 centers, synthetic data.

    python -m mlcd_jax.train --config=configs/test_tiny.py --workdir=/tmp/tiny
    python -m mlcd_jax.train --config=configs/test_tiny.py:unicom --workdir=/tmp/tiny_unicom
    python -m mlcd_jax.train --config=configs/test_tiny.py:regions --workdir=/tmp/tiny_regions

`regions`: RICE's two region heads beside the image head (an object head, single-label, and an
OCR head, multi-label) on 4 synthetic regions per image, one Region Transformer layer.
"""

from mlcd_jax.config import presets, schema


def get_config(arg=None):
    presets.check_arg(arg, (None, "mlcd", "unicom", "regions"), "configs/test_tiny.py")
    c = schema.base_config()
    c.mesh = (("data", -1),)
    c.model.size = "micro"          # width 32, depth 2, patch 4, 16 px
    c.model.embed_dim = 32
    c.model.dtype = "float32"
    c.head.num_classes = 60         # not a multiple of 8: the head pads
    c.head.sample_ratio = 0.5
    c.head.loss = arg if arg in ("mlcd", "unicom") else "mlcd"
    c.data.source = "synthetic"
    c.data.image_size = 16
    c.data.num_labels = 4
    c.data.num_examples = 2048
    c.data.noise = 0.5
    c.batch_size = 64
    c.total_steps = 40
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.05
    c.log_every = 5
    c.checkpoint_every = 10
    if arg == "regions":
        c.model.region_layers = 1
        c.data.regions_per_image = 4
        c.heads.objects = schema.region_head(num_classes=30, loss="unicom",
                                             sample_ratio=0.5)
        c.heads.ocr = schema.region_head(num_classes=20, loss="mlcd", num_labels=3,
                                         regions="text", sample_ratio=0.5, weight=0.5)
    return c
