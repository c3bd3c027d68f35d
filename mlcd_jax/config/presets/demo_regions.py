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

ARGS = ("image", "objects", "ocr")


def get_config(arg="image"):
    presets.check_arg(arg, ARGS, "configs/demo_regions.py")
    c = schema.base_config()
    c.mesh = (("data", -1),)
    c.model.size = "demo"
    c.model.embed_dim = 64
    c.model.dtype = "float32"
    c.head.loss = "mlcd"
    c.head.num_classes = 64
    c.head.sample_ratio = 1.0       # K is small: every class, exactly (as the demo)
    c.data.source = "digits_regions"
    c.data.split = "train"
    c.data.image_size = 32
    c.data.num_labels = 4
    c.data.crop_scale = (0.6, 1.0)
    c.data.flip = False             # a mirrored digit is another glyph
    c.batch_size = 128
    c.total_steps = 300
    c.optim.lr = 5e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.log_every = 20
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
