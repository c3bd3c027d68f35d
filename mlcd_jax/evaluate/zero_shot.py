"""Zero-shot classification and image–text retrieval from embeddings (CLIP's protocols).

Zero-shot: each class is the average of its prompts' normalised text embeddings ("a photo of a
{}." …), renormalised; an image's class is its most similar class embedding. Retrieval (the
COCO / Flickr protocol, several captions per image): image→text Recall@K counts an image as found
when any of its captions is among its K most similar texts; text→image, a caption when its image
is among the K most similar images.
"""

from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(prompt_embeddings: np.ndarray) -> np.ndarray:
    """(C, P, D) embeddings of P prompts for each of C classes → (C, D): CLIP's averaged,
    renormalised class embeddings."""
    return normalize(normalize(prompt_embeddings).mean(axis=1))


def zero_shot(images: np.ndarray, classes: np.ndarray, labels: np.ndarray,
              ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy of classifying `images` (N, D) by their most similar of `classes` (C, D)."""
    scores = normalize(images) @ normalize(classes).T
    order = np.argsort(-scores, axis=1, kind="stable")
    labels = np.asarray(labels)
    return {f"top{k}": float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
            for k in ks if k <= classes.shape[0]}


def retrieval(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray,
              ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways. images (N, D), texts (T, D), text_image (T,): the image each text
    describes."""
    text_image = np.asarray(text_image)
    without = np.setdiff1d(np.arange(len(images)), text_image)
    if len(without):
        raise ValueError(f"retrieval: {len(without)} images have no caption (e.g. image "
                         f"{without[0]}); every image needs at least one")
    sims = normalize(images) @ normalize(texts).T                        # (N, T)
    # Image → text: the best rank among the image's own captions.
    order = np.argsort(-sims, axis=1, kind="stable")                     # texts by similarity
    own = text_image[order] == np.arange(len(images))[:, None]
    first_i2t = np.argmax(own, axis=1)
    # Text → image: the rank of the caption's image.
    order = np.argsort(-sims.T, axis=1, kind="stable")                   # images by similarity
    first_t2i = np.argmax(order == text_image[:, None], axis=1)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(np.mean(first_i2t < k))
        out[f"text_to_image_R@{k}"] = float(np.mean(first_t2i < k))
    return out
