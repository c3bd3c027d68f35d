"""Zero-shot classification and image–text retrieval from embeddings (CLIP's protocols).

Zero-shot: each class is the average of its prompts' normalised text embeddings ("a photo of a
{}." …), renormalised; an image's class is its most similar class embedding. Retrieval (the
COCO / Flickr protocol, several captions per image): image→text Recall@K counts an image as found
when any of its captions is among its K most similar texts; text→image, a caption when its image
is among the K most similar images.
"""

from __future__ import annotations

import numpy as np

from mlcd_jax.labels.store import normalize
from mlcd_jax.runtime.errors import UserError


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
        raise UserError(f"retrieval: {len(without)} images have no caption (e.g. image "
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


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_names(dataset: str, train, configured=(), field: str = "--class_names") -> tuple:
    """The configured class names, else the dataset's own (digits, a folder's sub-folders)."""
    if configured:
        return tuple(configured)
    if dataset in ("digits", "digits_canvas", "digits_regions"):
        return DIGIT_NAMES
    if getattr(train, "class_index", None):
        return tuple(sorted(train.class_index, key=train.class_index.get))
    raise UserError(f"{field}: {dataset} does not name its classes; give them")


def captions(source, labels, *, templates, names, field: str = "--templates") -> list[list[str]]:
    """Each image's captions (`row_captions`), for every image of `source` (in memory: for a
    held-out split; LiT reads a train split's one row at a time). `source` has a record per
    label: the records that were embedded (`features.extract`'s, as a Subset)."""
    if len(labels) != len(source):
        raise ValueError(f"{len(labels)} labels for {len(source)} images: give the records that "
                         "were embedded (features.extract's records)")
    check_templates(source, templates, field)
    return [row_captions(source, i, y, templates=templates, names=names, field=field)
            for i, y in enumerate(labels)]


def check_templates(source, templates, field: str = "--templates") -> None:
    if any("{caption}" in t for t in templates) and not hasattr(source, "captions"):
        raise UserError(f"{field}: {{caption}}, but this dataset has no captions of its own; "
                        "use {name} templates")


def row_captions(source, i: int, label: int, *, templates, names,
                 field: str = "--templates") -> list[str]:
    """Image i's captions: `templates` filled with its class {name}, what the dataset says of
    the image (`source.caption_fields(i)`: the demo's canvases give {size} and {place}) and its
    own {caption}s (`source.captions(i)`: a template with {caption} gives one caption per text
    the image came with). An unlabelled image (label -1) has no {name}."""
    own = any("{caption}" in t for t in templates)
    known = ({"name": names[label]} if label >= 0 and names else {}) | (
        source.caption_fields(i) if hasattr(source, "caption_fields") else {})
    texts = source.captions(i) if own else [None]
    if not texts:
        raise UserError(f"{field}: {{caption}}, but {source.name(i)} has no caption (no "
                        "text beside it); give every image one, or use {name} templates")
    try:
        return [t.format(**known, caption=text) for t in templates
                for text in (texts if "{caption}" in t else texts[:1])]
    except (KeyError, IndexError) as e:
        why = ("it has no class label" if e.args[0] == "name" else
               f"it is not a caption field of this dataset (it has "
               f"{', '.join([*known, 'caption'] if own else known)})")
        raise UserError(f"{field}: {{{e.args[0]}}} cannot be filled for {source.name(i)}: "
                        f"{why}") from None


def embed_texts(tower, tokens, batch: int = 1024) -> np.ndarray:
    """A text tower's embeddings of (N, T) token ids, in batches."""
    import jax
    import jax.numpy as jnp
    forward = jax.jit(lambda t: tower(t).embedding)
    return np.concatenate([np.asarray(forward(jnp.asarray(tokens[s:s + batch])))
                           for s in range(0, len(tokens), batch)])


def text_evals(tower, tokenizer, names, prompts, images, labels, image_captions) -> dict:
    """Zero-shot accuracy (each class the average of its `prompts`; skipped when `names` is
    empty: unlabelled data) and retrieval (every caption of each image) of a text tower against
    image embeddings."""
    result = {}
    if names:
        prompt_tokens = tokenizer([p.format(name=n) for n in names for p in prompts])
        classes = class_embeddings(
            embed_texts(tower, prompt_tokens).reshape(len(names), len(prompts), -1))
        result = {f"zero_shot_{k}": v for k, v in zero_shot(images, classes, labels).items()}
    texts = [t for row in image_captions for t in row]
    owner = np.repeat(np.arange(len(image_captions)), [len(row) for row in image_captions])
    return result | retrieval(images, embed_texts(tower, tokenizer(texts)), owner)
