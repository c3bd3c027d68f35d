"""Analytic FLOPs of a training step (matmuls only, 2 per multiply-add), for MFU and planning.

Model FLOPs follow the usual MFU convention: forward + backward = 3 × forward, and recomputation
under remat is not counted (it is work the hardware does, not work the model needs). XLA's own cost
analysis counts a `lax.scan` body once, so it undercounts scanned ViTs by their depth.
"""

from __future__ import annotations

from mlcd_jax.data import transforms
from mlcd_jax.models import vit
from mlcd_jax.runtime.mesh import padded_num_classes
from mlcd_jax.training.sharded_head import num_sampled


def encoder_forward(cfg: vit.ViTConfig, height: int, width: int) -> float:
    """Forward FLOPs of one image: patch embedding, blocks (projections, attention, MLP),
    projection."""
    return encoder_forward_patches(cfg, (height // cfg.patch) * (width // cfg.patch))


def encoder_forward_patches(cfg: vit.ViTConfig, patches: int) -> float:
    """`encoder_forward` of an image of `patches` patches (at native resolution: the budget, as
    the padding is computed too)."""
    tokens = patches + 1
    w = cfg.width
    embed = 2 * patches * cfg.patch ** 2 * cfg.channels * w
    block = (2 * tokens * 4 * w * w            # q, k, v, out projections
             + 2 * 2 * tokens * tokens * w     # q·kᵀ and attention·v
             + 2 * tokens * 2 * w * cfg.mlp_dim)  # fc1, fc2
    projection = 2 * w * cfg.embed_dim if cfg.embed_dim else 0
    return float(embed + cfg.depth * block + projection)


def region_forward(cfg: vit.ViTConfig, patches: int, regions: int, layers: int) -> float:
    """Forward FLOPs of RICE's Region Transformer layers for one image (models/region.py):
    `regions` region tokens as queries over themselves and `patches` patch tokens (keys and values
    projected for both), the MLP on the region tokens, and the ViT's projection of each region's
    embedding."""
    n, keys, w = regions, regions + patches, cfg.width
    block = (2 * n * 2 * w * w                 # q and out projections (the region tokens)
             + 2 * keys * 2 * w * w            # k and v projections (regions and patches)
             + 2 * 2 * n * keys * w            # q·kᵀ and attention·v
             + 2 * n * 2 * w * cfg.mlp_dim)    # fc1, fc2
    projection = 2 * n * w * cfg.embed_dim if cfg.embed_dim else 0
    return float(layers * block + projection)


def head_forward(embed_dim: int, num_classes: int, num_labels: int, sample_ratio: float,
                 num_devices: int) -> float:
    """Forward FLOPs of one sample in the head: cosines to the sampled negatives and positives."""
    local = padded_num_classes(num_classes, num_devices) // num_devices
    scored = num_devices * num_sampled(local, sample_ratio) + num_labels
    return float(2 * embed_dim * scored)


def per_step(c, cfg: vit.ViTConfig, num_devices: int) -> dict:
    """Model FLOPs of one optimizer step of config `c` (its model `cfg`) on `num_devices`
    devices."""
    size, native = c.data.image_size, transforms.native_sizing(c.data, cfg.patch)
    encoder = (encoder_forward(cfg, size, size) if native is None
               else encoder_forward_patches(cfg, native.max_tokens))
    dim = cfg.embed_dim or cfg.width
    head = head_forward(dim, c.head.num_classes, c.data.num_labels, c.head.sample_ratio,
                        num_devices)
    # RICE: the region layers, and each region head scoring every region slot of an image
    regions, layers = c.data.regions_per_image, c.model.region_layers
    region = 0.0
    if regions and layers:
        patches = native.max_tokens if native else (size // cfg.patch) ** 2
        region = region_forward(cfg, patches, regions, layers) + regions * sum(
            head_forward(dim, h.num_classes, h.num_labels, h.sample_ratio, num_devices)
            for h in c.heads.values())
    per_image = encoder + head + region
    return {"encoder_forward_per_image": encoder, "head_forward_per_sample": head,
            "region_forward_per_image": region,
            "per_step": 3.0 * per_image * c.batch_size, "per_image": 3.0 * per_image}
