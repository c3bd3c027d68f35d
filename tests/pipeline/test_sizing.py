"""The choices `python -m mlcd_jax.pretrain` makes from the data and the machine
(mlcd_jax/pipeline/sizing.py), each against values worked out by hand."""

import pytest

from mlcd_jax.pipeline import sizing


@pytest.mark.parametrize("images, centers", [
    (400, 20),                    # N / 20
    (100, 16),                    # at least 16 ...
    (10, 10),                     # ... but never more than the images
    (2_000_000, 100_000),
    (400_000_000, 1_000_000),     # the paper's K at LAION-400M
])
def test_num_centers_grows_with_the_images(images, centers):
    assert sizing.num_centers(images) == centers


@pytest.mark.parametrize("centers, labels", [
    (16, 2), (20, 2), (64, 4), (1_000, 8), (1_000_000, 8),  # round(log2 K) - 2, in 1 … 8
    (2, 1),
])
def test_num_labels_grows_with_log_k(centers, labels):
    assert sizing.num_labels(centers) == labels


def test_two_level_from_100k_centers():
    assert [sizing.two_level(k) for k in (20, 99_999, 100_000, 1_000_000)] == [1, 1, 8, 8]


@pytest.mark.parametrize("configured, images, batch", [
    (128, 400, 128),              # the config's, when an epoch has two steps of it
    (128, 200, 64),               # else the largest power of two with two steps an epoch
    (128, 100, 32),
    (128, 20, 8),                 # at least 8: every device count up to 8 divides it
    (32_768, 10_000, 4_096),
])
def test_batch_fits_the_data(configured, images, batch):
    assert sizing.batch_size(configured, images) == batch


def test_steps_fill_the_budget_between_one_and_max_epochs():
    # 100 images/s for a minute: 6,000 images = 46 steps of 128 (14.7 epochs of 400)
    steps, epochs = sizing.steps(rate=100, minutes=1, images=400, batch=128)
    assert steps == 46 and epochs == pytest.approx(46 * 128 / 400)
    # a slow machine still trains one whole epoch (ceil(400 / 128) = 4 steps)
    assert sizing.steps(rate=1, minutes=0.1, images=400, batch=128)[0] == 4
    # a fast one stops at MAX_EPOCHS (30 × 400 / 128 = 93.75 → 94 steps)
    assert sizing.MAX_EPOCHS == 30
    assert sizing.steps(rate=1e6, minutes=10, images=400, batch=128)[0] == 94


def test_warmup_is_at_most_a_tenth_of_the_run():
    assert [sizing.warmup(20, s) for s in (5, 60, 1_000)] == [1, 6, 20]


def test_default_config_by_machine_and_regions():
    assert sizing.default_config("cpu", regions=False) == "cpu_small"
    assert sizing.default_config("gpu", regions=False) == "mlcd_laion400m:B/16"
    assert sizing.default_config("tpu", regions=False) == "mlcd_laion400m:B/16"
    assert sizing.default_config("cpu", regions=True) == "rice:cpu_small,objects"
    assert sizing.default_config("gpu", regions=True) == "rice:B/16,objects"


def test_learning_rate_follows_a_smaller_batch_by_its_square_root():
    assert sizing.learning_rate(5e-3, 128, 128) == 5e-3
    assert sizing.learning_rate(5e-3, 128, 32) == pytest.approx(2.5e-3)
    assert sizing.learning_rate(5e-4, 32_768, 512) == pytest.approx(6.25e-5)


def test_regions_with_texts_add_the_ocr_head():
    assert sizing.default_config("cpu", regions=True, texts=True) == "rice:cpu_small"
    assert sizing.default_config("gpu", regions=True, texts=True) == "rice:B/16"
