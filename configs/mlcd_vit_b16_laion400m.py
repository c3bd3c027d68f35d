"""MLCD ViT-B/16 on LAION-400M, the paper's recipe: K = 1,000,000 clusters, l = 8 labels, r = 0.1,
m = 0.3, s = 32, AdamW (wd 0.2), 2,000 warm-up steps then cosine, batch 32,768, 32 epochs, lr 5e-4,
embedding 512, 224 px.

    python -m mlcd_jax.train --config=configs/mlcd_vit_b16_laion400m.py --workdir=gs://.../b16
    python -m mlcd_jax.train --config=configs/mlcd_vit_b16_laion400m.py --workdir=/tmp/b16 --compile_only

Expected compute (arithmetic, not a measurement): forward 35.1 GFLOP/image (12 blocks × 197 tokens ×
(24·768² + 4·197·768) + patch embedding), ×3 for training, + 0.3 GFLOP for the head = 105.6
GFLOP/image; 1.28e10 images (390,625 steps): 1.35e21 FLOP, about 38 hours on 80 A100s at 40 % of
their 312 TFLOP/s bf16 peak.
"""

from mlcd_jax import config as config_lib


def get_config(arg=None):
    config_lib.check_arg(arg, (None,), "configs/mlcd_vit_b16_laion400m.py")
    return config_lib.laion400m_recipe("B/16", lr=5e-4, embed_dim=512)
