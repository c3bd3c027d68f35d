"""Several cluster-discrimination heads in one step: the image head (`config.head`) and any number
of region heads (`config.heads`, RICE: Xie et al., ICCV 2025, arXiv 2507.20025, §3.3), each with
its own class centers sharded over the mesh, its K, loss, sampling and margin, a weight and a
learning-rate multiplier; the step's loss is their weighted sum, each head's metrics under its
name. A region head scores the region embeddings (the Region Transformer layer's, B × N of them)
against its centers, its padded and unlabelled regions counting for nothing
(`RegionHead.skip_unlabelled`). With no region heads the step is the image head's alone, as it
always was (the same key, the same loss).

RICE's heads: object regions with a single-label margin softmax over K ≈ 1M region clusters
(`loss="unicom"`), OCR regions with the multi-label loss over the tokenizer's vocabulary
(`loss="mlcd"`, their text's token ids as labels), beside the image head; negatives at ρ = 0.1.
"""

from __future__ import annotations

import jax

from mlcd_jax.config.schema import Head, RegionHead
from mlcd_jax.training import sharded_head as head_lib


def loss(embedding, centers, labels, region_embedding, region_centers, region_labels, *, key,
         image_cfg: Head, region_heads: tuple[RegionHead, ...] = (), mesh=None):
    """The weighted sum of the heads' losses (each head's `weight`) and their metrics (the image
    head's under their own names, as ever; a region head's under "NAME/..."). `region_embedding`
    (B, N, D), `region_labels` {name: (B, N, l)}; the region heads draw from `key` folded with their
    place (the image head uses `key` itself)."""
    image_loss, metrics = head_lib.loss(embedding, centers, labels, key=key, cfg=image_cfg,
                                        mesh=mesh)
    total = image_loss if image_cfg.weight == 1.0 else image_cfg.weight * image_loss
    if not region_heads:
        return total, metrics
    metrics = metrics | {"image/loss": image_loss}
    flat = region_embedding.reshape(-1, region_embedding.shape[-1])
    for i, h in enumerate(region_heads, start=1):
        labels_h = region_labels[h.name]
        value, found = head_lib.loss(flat, region_centers[h.name],
                                     labels_h.reshape(-1, labels_h.shape[-1]),
                                     key=jax.random.fold_in(key, i), cfg=h, mesh=mesh)
        total = total + h.weight * value
        metrics |= {f"{h.name}/loss": value} | {f"{h.name}/{k}": v for k, v in found.items()
                                                if k != "rows_used"}
    return total, metrics
