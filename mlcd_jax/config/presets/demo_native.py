"""Native resolution's demo runs (`python -m mlcd_jax.demo --native` drives them): the demo's RoPE
ViT on `digits_strips` (strips of 1–6 digits, wide or tall: aspect ratios from 1:6 to 6:1), the
same token budget (64 patches of 4 px), head, labels (each digit's cluster of the clean glyphs,
up to 6 per strip) and steps in both:

    configs/demo_native.py:square   every strip a 32 × 32 crop (random-resized crops in training,
                                    the centre crop in evaluation: CLIP's preprocessing)
    configs/demo_native.py:squash   every whole strip resized to 32 × 32, its aspect ratio lost
    configs/demo_native.py:native   every strip at its own aspect ratio, the largest size within
                                    64 patches (NaFlex), padded to 64

The label store's path is set by the driver (data.labels).
"""

from mlcd_jax.config import presets
from mlcd_jax.config.presets import demo

ARGS = ("square", "squash", "native")


def get_config(arg="native"):
    presets.check_arg(arg, ARGS, "configs/demo_native.py")
    c = demo.digits("digits_strips")
    c.data.resolution = arg         # square and squash: 32 × 32 = 8 × 8 = 64 patches of 4 px
    c.data.max_tokens = 64 if arg == "native" else 0  # the same budget
    c.data.num_labels = 6           # a strip's digits' clusters, each once (−1 after)
    c.data.crop_scale = (0.8, 1.0)  # a crop loses little of a strip
    return c
