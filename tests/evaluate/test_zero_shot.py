"""Zero-shot classification on a case whose answer is known, and Recall@K against a brute-force
count written here."""

import numpy as np
import pytest

from mlcd_jax.evaluate import zero_shot


def test_zero_shot_on_a_constructed_case():
    rng = np.random.default_rng(0)
    c, d, n = 5, 16, 200
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    directions = basis[:c]                                               # orthonormal classes
    # Three prompts per class whose offsets (orthogonal to every class) cancel on average.
    offset = 0.3 * basis[c:c + 1]
    prompts = np.stack([directions + offset, directions - offset, directions], axis=1)
    classes = zero_shot.class_embeddings(prompts)
    np.testing.assert_allclose(classes, directions, atol=1e-6)
    labels = rng.integers(0, c, n)
    images = directions[labels] + 0.05 * rng.normal(size=(n, d))
    wrong = labels.copy()
    wrong[:17] = (labels[:17] + 1) % c                                   # 17 mislabelled images
    result = zero_shot.zero_shot(images, classes, wrong, ks=(1, 5))
    assert result["top1"] == pytest.approx((n - 17) / n)
    assert result["top5"] == 1.0                                         # 5 classes: all within


def brute_force_recall(images, texts, text_image, k):
    norms = np.outer(np.linalg.norm(images, axis=1), np.linalg.norm(texts, axis=1))
    sims = images @ texts.T / norms
    i2t = t2i = 0
    for i in range(len(images)):
        ranked = sorted(range(len(texts)), key=lambda j: (-sims[i, j], j))[:k]
        i2t += any(text_image[j] == i for j in ranked)
    for j in range(len(texts)):
        ranked = sorted(range(len(images)), key=lambda i: (-sims[i, j], i))[:k]
        t2i += text_image[j] in ranked
    return i2t / len(images), t2i / len(texts)


def test_recall_at_k_equals_brute_force():
    rng = np.random.default_rng(1)
    n, d = 40, 8
    text_image = np.concatenate([np.arange(n), rng.integers(0, n, 3 * n)])  # 1–5 captions each
    images = rng.normal(size=(n, d))
    texts = images[text_image] + 1.2 * rng.normal(size=(len(text_image), d))
    result = zero_shot.retrieval(images, texts, text_image, ks=(1, 5, 10))
    for k in (1, 5, 10):
        i2t, t2i = brute_force_recall(images, texts, text_image, k)
        assert result[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert result[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < result["image_to_text_R@1"] < result["image_to_text_R@10"] <= 1


def test_an_image_without_caption_is_refused():
    with pytest.raises(ValueError, match="1 images have no caption"):
        zero_shot.retrieval(np.eye(3), np.eye(3)[:2], np.array([0, 1]))


class Captioned:
    """Three images with their own captions (the second has two), as a web dataset gives them."""
    texts = [["a dog on grass"], ["two cats", "cats asleep"], []]

    def __len__(self):
        return 3

    def name(self, i):
        return f"img{i}.jpg"

    def captions(self, i):
        return self.texts[i]

    def caption_fields(self, i):
        return {"place": "left"}


def test_captions_fill_templates_with_names_fields_and_the_images_own_texts():
    src, names = Captioned(), ("dog", "cat")
    src.texts = Captioned.texts[:2] + [["a dog"]]
    got = zero_shot.captions(src, np.array([0, 1, 0]),
                             templates=("{caption}", "a {name} at the {place}"), names=names)
    assert got == [["a dog on grass", "a dog at the left"],
                   ["two cats", "cats asleep", "a cat at the left"],
                   ["a dog", "a dog at the left"]]
    # Unlabelled images (-1) have captions but no {name}.
    unlabelled = np.full(3, -1)
    assert zero_shot.captions(src, unlabelled, templates=("{caption}",), names=()) == src.texts
    with pytest.raises(ValueError, match=r"\{name\} cannot be filled for img0.jpg: it has no "
                                         "class label"):
        zero_shot.captions(src, unlabelled, templates=("{name}",), names=())
    src.texts = Captioned.texts
    with pytest.raises(ValueError, match="img2.jpg has no caption"):
        zero_shot.captions(src, unlabelled, templates=("{caption}",), names=())
    with pytest.raises(ValueError, match="has no captions of its own"):
        zero_shot.captions([1, 2], [0, 1], templates=("{caption}",), names=names)
    with pytest.raises(ValueError, match=r"\{size\} cannot be filled.*it has name, place, caption"):
        zero_shot.captions(src, [0, 1, 0], templates=("{caption} {size}",), names=names)
