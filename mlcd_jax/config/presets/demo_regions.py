"""The region demo's pretraining runs (`python -m mlcd_jax.demo --regions` drives them): the demo's
RoPE ViT on `digits_regions` canvases (several digits each, one line of small digits as text), at
32 px, with the same image head and step budget in each:

    configs/demo_regions.py:image     MLCD on whole images alone (l = 4 of K = 64 image clusters)
    configs/demo_regions.py:objects   + an object-region head (RICE: one label per region, its
                                      nearest of K = 64 clusters of the regions' clean glyphs;
                                      UNICOM's margin softmax), one Region Transformer layer
    configs/demo_regions.py:ocr       + an OCR head too (the text line's token ids, MLCD)

The label stores' paths are set by the driver (data.labels, heads.*.labels).
"""

from mlcd_jax.config import presets, schema
from mlcd_jax.config.presets import demo

ARGS = ("image", "objects", "ocr")


def get_config(arg="image"):
    presets.check_arg(arg, ARGS, "configs/demo_regions.py")
    c = demo.digits("digits_regions")
    c.data.num_labels = 4
    c.data.crop_scale = (0.6, 1.0)
    c.total_steps = 300
    c.checkpoint_every = 300
    if arg in ("objects", "ocr"):
        c.model.region_layers = 1
        c.data.regions_per_image = 4  # a canvas holds 2–3 objects and one text line
        c.heads.objects = schema.region_head(num_classes=64, loss="unicom", regions="objects",
                                             sample_ratio=1.0)
    if arg == "ocr":
        c.heads.ocr = schema.region_head(num_classes=0, loss="mlcd", regions="text",
                                         num_labels=4, sample_ratio=1.0)
    return c
