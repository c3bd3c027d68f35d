"""A small MLCD run that trains in minutes on a CPU, on your own images (`python -m
mlcd_jax.pretrain` takes it by default there): the demo's RoPE ViT (width 64, depth 4, patch 4,
a 64-d embedding, float32) on 32 × 32 crops of ArrayRecord files, batch 128, AdamW at 5e-3 with
20 warm-up steps, for a number of epochs of the data's own size. Set the data and its labels:

    python -m mlcd_jax.train --config=cpu_small --workdir=RUN \
        --config.data.path='data/train-*.array_record' --config.data.labels=LAB \
        --config.head.num_classes=K --config.data.num_labels=L

No horizontal flips: a mirrored digit, letter or sign is another class; where a mirror keeps the
class (most photos), `--config.data.flip=True`.
"""

from mlcd_jax.config import presets
from mlcd_jax.config.presets import demo


def get_config(arg=None):
    presets.check_arg(arg, (None,), "configs/cpu_small.py")
    c = demo.digits("arrayrecord")
    c.head.num_classes = 64         # K: set it to your label store's
    c.data.num_labels = 4           # l: at most your label store's
    c.data.crop_scale = (0.35, 1.0)  # random-resized crops of photos keep most of the image
    c.total_steps = 0
    c.epochs = 20.0                 # over the data's own number of images
    c.optim.warmup_steps = 20       # of the few hundred steps a small folder gets
    c.log_every = 10
    c.checkpoint_every = 200
    return c
