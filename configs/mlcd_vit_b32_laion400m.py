"""MLCD ViT-B/32 on LAION-400M, the paper's recipe: K = 1,000,000 clusters, l = 8 labels, r = 0.1,
m = 0.3, s = 32, AdamW (wd 0.2), 2,000 warm-up steps then cosine, batch 32,768, 32 epochs, lr 5e-4,
embedding 512, 224 px.

    python -m mlcd_jax.train --config=configs/mlcd_vit_b32_laion400m.py --workdir=gs://.../b32
    python -m mlcd_jax.train --config=configs/mlcd_vit_b32_laion400m.py --workdir=/tmp/b32 --compile_only

Expected compute (arithmetic, not a measurement): forward 8.8 GFLOP/image (12 blocks × 50 tokens ×
(24·768² + 4·50·768) + patch embedding), ×3 for training, + 0.3 GFLOP for the head (r·K·D·6)
= 26.8 GFLOP/image; 32 epochs × 400M images = 1.28e10 images, 390,625 steps: 3.4e20 FLOP, about
9.5 hours on 80 A100s at 40 % of their 312 TFLOP/s bf16 peak.
"""

from mlcd_jax import config as config_lib


def get_config(arg=None):
    config_lib.check_arg(arg, (None,), "configs/mlcd_vit_b32_laion400m.py")
    return config_lib.laion400m_recipe("B/32", lr=5e-4, embed_dim=512)
