"""LiT on your own labelled images (README, "From the demo to real scale", step 5): a B text
tower (CLIP's) against a locked encoder, captions from class names in CLIP-style templates.

    configs/lit.py          CLIP's softmax loss
    configs/lit.py:siglip   SigLIP's sigmoid loss
"""

from mlcd_jax.config import presets, schema


def get_config(arg=""):
    presets.check_arg(arg, ("", "siglip"), "configs/lit.py")
    c = schema.lit_config()
    c.loss.kind = "siglip" if arg == "siglip" else "clip"
    c.data.source = "folder"
    c.evals.every = 1000
    return c
