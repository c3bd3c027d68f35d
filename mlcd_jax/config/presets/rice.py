"""RICE (Xie et al., ICCV 2025, arXiv 2507.20025): the MLCD recipe (configs/mlcd_laion400m.py) plus
a Region Transformer layer and two region heads, on records converted with their boxes
(`convert --regions`) and region labels made by `labels embed --regions` → kmeans → assign
(object regions) and `labels ocr` (OCR regions). Its numbers are the issue's reading of the paper:
1M region clusters, single-label margin softmax for objects, MLCD over the tokenizer's vocabulary
for OCR regions, ρ = 0.1; N region slots per image.

    python -m mlcd_jax.train --config=configs/rice.py:B/16 --workdir=RUN \
        --config.data.path='data/train-*.array_record' --config.data.labels=LAB \
        --config.heads.objects.labels=OBJ_LAB --config.heads.ocr.labels=OCR_LAB \
        --config.heads.ocr.num_classes=VOCAB   # 49,408 (CLIP's BPE) unless set
    python -m mlcd_jax.plan --config=configs/rice.py:B/16 --topology=v5p:4x4x4

`:B/16,objects` (any size, then ",objects"): the object head alone, for data without OCR regions.
`:cpu_small` (and `:cpu_small,objects`): the same heads on the `cpu_small` preset's model and data,
with K sized for a folder (64 object clusters; the OCR head over the 4,096 ids of the BPE that
`labels ocr` trains without `--tokenizer`); `python -m mlcd_jax.pretrain --regions` takes it on a
CPU.
A head whose label store is not set stops the run at start, naming the field.
"""

from mlcd_jax.config import presets, recipes, schema
from mlcd_jax.config.presets import cpu_small

REGIONS_PER_IMAGE = 10  # region slots per image (subsampled, or repeated when fewer)


SIZES = (*recipes.VARIANTS, "cpu_small")


def get_config(arg="B/16"):
    presets.check_arg(arg, SIZES + tuple(f"{v},objects" for v in SIZES), "configs/rice.py")
    size, _, only = arg.partition(",")
    if size == "cpu_small":  # every class scored: K is small
        c = cpu_small.get_config()
        objects, ocr, ratio, negatives = 64, 4096, 1.0, "uniform"
    else:
        lr, embed_dim = recipes.VARIANTS[size]
        c = recipes.laion400m_recipe(size, lr=lr, embed_dim=embed_dim)
        objects, ocr, ratio, negatives = 1_000_000, 49_408, 0.1, "batch"
    c.model.region_layers = 1
    c.data.regions_per_image = REGIONS_PER_IMAGE
    c.heads.objects = schema.region_head(num_classes=objects, loss="unicom", regions="objects",
                                         sample_ratio=ratio, negatives=negatives)
    if only != "objects":
        c.heads.ocr = schema.region_head(num_classes=ocr, loss="mlcd", regions="text",
                                         num_labels=16, sample_ratio=ratio, negatives=negatives)
    return c
