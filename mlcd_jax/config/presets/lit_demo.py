"""LiT on the demo's encoders (`make demo` drives it; set --config.image.model=RUN): a tiny text
tower learns captions of each training canvas ("a small seven in the top left" …: the digit, its
size and place, worded six ways) against the locked image encoder; zero-shot (digit names in three
prompts) and retrieval on the held-out canvases.

    configs/lit_demo.py          CLIP's softmax loss
    configs/lit_demo.py:siglip   SigLIP's sigmoid loss
"""

from mlcd_jax.config import presets, schema


def get_config(arg=""):
    presets.check_arg(arg, ("", "siglip"), "configs/lit_demo.py")
    c = schema.lit_config()
    c.image.image_size = 32
    c.text.size = "tiny"
    c.text.context_length = 16
    c.text.vocab_size = 400
    c.loss.kind = "siglip" if arg == "siglip" else "clip"
    c.data.source = "digits_canvas"
    c.data.test_split = "test"
    c.data.templates = ("a {size} {name} in the {place}", "the digit {name}, {size}, {place}",
                        "a photo of a {size} handwritten {name} at the {place} of the canvas",
                        "{place}: a {name}", "a {size} {name}", "{name}")
    c.evals.prompts = ("a photo of a {name}.", "the digit {name}", "a handwritten {name}")
    c.batch_size = 256
    c.total_steps = 300
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.log_every = 50
    c.checkpoint_every = 100
    c.evals.every = 100
    return c
