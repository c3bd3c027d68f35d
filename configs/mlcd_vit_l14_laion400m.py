"""MLCD ViT-L/14 on LAION-400M, the paper's recipe: K = 1,000,000 clusters, l = 8 labels, r = 0.1,
m = 0.3, s = 32, AdamW (wd 0.2), 2,000 warm-up steps then cosine, batch 32,768, 32 epochs, lr 4e-4,
embedding 768, 224 px.

    python -m mlcd_jax.train --config=configs/mlcd_vit_l14_laion400m.py --workdir=gs://.../l14
    python -m mlcd_jax.train --config=configs/mlcd_vit_l14_laion400m.py --workdir=/tmp/l14 --compile_only

Expected compute (arithmetic, not a measurement): forward 162 GFLOP/image (24 blocks × 257 tokens ×
(24·1024² + 4·257·1024) + patch embedding), ×3 for training, + 0.5 GFLOP for the head = 486
GFLOP/image; 1.28e10 images (390,625 steps): 6.2e21 FLOP, about 7 days on 80 A100s at 40 % of their
312 TFLOP/s bf16 peak.
"""

from mlcd_jax import config as config_lib


def get_config(arg=None):
    config_lib.check_arg(arg, (None,), "configs/mlcd_vit_l14_laion400m.py")
    return config_lib.laion400m_recipe("L/14", lr=4e-4, embed_dim=768)
