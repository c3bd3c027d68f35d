"""The choices `python -m mlcd_jax.pretrain` makes for the user, from the data and the machine:
each a rule of a few lines, tested, and overridden by a flag that names it.

K (clusters) grows with the images: about 20 images a cluster on a folder, the paper's 1M
(400 images a cluster) at LAION scale. l (labels per image) grows with log K: 8 at the paper's
K = 1M, fewer where there are few clusters to spread over. The batch fits the data (at least two
steps an epoch) and every device count up to 8, the learning rate follows it (square-root
scaling, as for Adam); the steps fill a time budget at the rate a short measured run reached,
between one and MAX_EPOCHS epochs.
"""

from __future__ import annotations

import math

MAX_CENTERS = 1_000_000       # the paper's K
IMAGES_PER_CENTER = 20        # K = N / 20 on a folder (the paper: N / 400 at 400M images)
MIN_CENTERS = 16
MAX_EPOCHS = 30               # a small folder is not repeated past this
MIN_IMAGES = 16               # two steps of the smallest batch


def num_centers(images: int) -> int:
    """K for `images` teacher embeddings."""
    return min(MAX_CENTERS, images, max(MIN_CENTERS, images // IMAGES_PER_CENTER))


def num_labels(centers: int) -> int:
    """l for K = `centers`: 8 at 1M (the paper's), 2 at K = 16."""
    return min(8, max(1, round(math.log2(centers)) - 2))


def two_level(centers: int) -> int:
    """faiss's two-level k-means from 100k centers on (parts clustered first), as the README's
    LAION path uses for K = 1M."""
    return 8 if centers >= 100_000 else 1


def batch_size(configured: int, images: int) -> int:
    """The config's batch, or the largest power of two with two steps an epoch (a power of two
    ≥ 8: any device count up to 8 divides it)."""
    fit = 1 << max(3, (images // 2).bit_length() - 1)
    return min(configured, fit)


def learning_rate(configured: float, configured_batch: int, batch: int) -> float:
    """The config's learning rate, for a batch the data made smaller: × √(batch / its batch)."""
    return configured * math.sqrt(batch / configured_batch)


def steps(rate: float, minutes: float, images: int, batch: int) -> tuple[int, float]:
    """(steps, epochs): as many steps as `minutes` of training at `rate` images a second, between
    one epoch and MAX_EPOCHS."""
    per_epoch = images / batch
    wanted = minutes * 60 * rate / batch
    total = max(math.ceil(per_epoch), min(math.floor(wanted), math.ceil(MAX_EPOCHS * per_epoch)))
    return total, total / per_epoch


def warmup(configured: int, total_steps: int) -> int:
    """The config's warm-up, at most a tenth of the run."""
    return min(configured, max(1, total_steps // 10))


def default_config(platform: str, regions: bool, texts: bool = False) -> str:
    """The preset for this machine: the small RoPE ViT on a CPU, the paper's B/16 recipe on a GPU
    or TPU; RICE's when the images have regions: its object-region head, and its OCR head where
    regions have texts."""
    size = "cpu_small" if platform == "cpu" else "B/16"
    if regions:
        return f"rice:{size}" if texts else f"rice:{size},objects"
    return "cpu_small" if platform == "cpu" else f"mlcd_laion400m:{size}"
