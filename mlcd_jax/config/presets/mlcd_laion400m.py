"""The paper's pretraining recipes (MLCD, ECCV 2024, §4.1) on LAION-400M, one per ViT variant:
K = 1,000,000 clusters, l = 8 labels, r = 0.1, m = 0.3, s = 32, AdamW (wd 0.2), 2,000 warm-up steps
then cosine, batch 32,768, 32 epochs, 224 px; CLIP-style ViTs (learned positions, as the released
B/32 and L/14 models), bf16, remat, scanned blocks.

    python -m mlcd_jax.train --config=configs/mlcd_laion400m.py:B/16 --workdir=gs://.../b16 \
        --config.data.path='data/train-*.array_record' --config.data.labels=LAB
    python -m mlcd_jax.train --config=configs/mlcd_laion400m.py:L/14 --workdir=/tmp/l14 \
        --compile_only
    python -m mlcd_jax.plan --config=configs/mlcd_laion400m.py:B/32 --topology=v5e:16x16

| variant | lr | embedding | forward GFLOP/image | train GFLOP/image | FLOP for 32 epochs | time |
|---|---:|---:|---:|---:|---:|---:|
| B/32 | 5e-4 | 512 | 8.8 | 26.8 | 3.4e20 | ~9.5 hours |
| B/16 | 5e-4 | 512 | 35.1 | 105.6 | 1.35e21 | ~38 hours |
| L/14 | 4e-4 | 768 | 162 | 486 | 6.2e21 | ~7 days |

Time: on 80 A100s at 40 % of 312 TFLOP/s. Arithmetic, not measurements: forward = depth × tokens ×
(24·width² + 4·tokens·width) + the patch embedding; training ×3, plus the head (r·K·D·6 ≈
0.3–0.5 GFLOP); 1.28e10 images = 390,625 steps. `python -m mlcd_jax.plan` compiles each for TPU
topologies (README's planning table).
"""

from mlcd_jax.config import presets, recipes


def get_config(arg="B/16"):
    presets.check_arg(arg, tuple(recipes.VARIANTS), "configs/mlcd_laion400m.py")
    lr, embed_dim = recipes.VARIANTS[arg]
    return recipes.laion400m_recipe(arg, lr=lr, embed_dim=embed_dim)
