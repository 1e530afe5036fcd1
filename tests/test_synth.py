"""SynthSigns: shapes, determinism, order independence, ROI sanity, class-colour sanity."""
from __future__ import annotations

import numpy as np
import pytest

from signtrap.data.synth import NUM_CLASSES
from signtrap.datasets.gtsrb import STOP
from signtrap.data.synth import SynthBatch, generate, render_sign

AHEAD_ONLY = 35


@pytest.fixture(scope="module")
def batch() -> SynthBatch:
    return generate(per_class=4, seed=123)


def test_shapes_and_dtypes(batch):
    n = 4 * NUM_CLASSES
    assert batch.images.shape == (n, 32, 32, 3) and batch.images.dtype == np.uint8
    assert batch.labels.shape == (n,) and batch.labels.dtype == np.int64
    assert batch.rois.shape == (n, 4) and batch.rois.dtype == np.int32


def test_all_labels_present(batch):
    assert np.array_equal(np.bincount(batch.labels, minlength=NUM_CLASSES),
                          np.full(NUM_CLASSES, 4))


def test_deterministic_for_equal_seeds(batch):
    again = generate(per_class=4, seed=123)
    assert np.array_equal(batch.images, again.images)
    assert np.array_equal(batch.labels, again.labels)
    assert np.array_equal(batch.rois, again.rois)


def test_different_seeds_differ(batch):
    other = generate(per_class=4, seed=124)
    assert not np.array_equal(batch.images, other.images)


def test_order_independent(batch):
    alone = generate(per_class=4, seed=123, classes=[STOP])
    assert np.array_equal(alone.labels, np.full(4, STOP))
    assert np.array_equal(alone.images, batch.images[batch.labels == STOP])
    assert np.array_equal(alone.rois, batch.rois[batch.labels == STOP])


def test_rois_inside_and_non_degenerate(batch):
    x1, y1, x2, y2 = batch.rois.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 32).all() and (y2 <= 32).all()
    # signs fill most of a GTSRB-like frame, so boxes are well above a few pixels
    assert ((x2 - x1) >= 8).all() and ((y2 - y1) >= 8).all()


def test_images_not_constant(batch):
    assert (batch.images.reshape(len(batch.images), -1).std(axis=1) > 1.0).all()


def test_stop_redder_than_ahead_only():
    b = generate(per_class=24, seed=7, classes=[STOP, AHEAD_ONLY])
    # compare the sign area only: the centre of the frame
    centre = b.images[:, 8:24, 8:24].astype(np.float64)
    stop = centre[b.labels == STOP].mean(axis=(0, 1, 2))
    ahead = centre[b.labels == AHEAD_ONLY].mean(axis=(0, 1, 2))
    assert stop[0] - stop[2] > ahead[0] - ahead[2] + 10  # stop: red minus blue is larger
    assert ahead[2] > stop[2]


def test_render_sign_other_size_and_roi():
    img, roi = render_sign(STOP, np.random.default_rng(0), size=48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    x1, y1, x2, y2 = roi
    assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48


def test_render_sign_uses_only_the_given_generator():
    a, ra = render_sign(3, np.random.default_rng(5))
    np.random.seed(0)  # global state must not matter
    b, rb = render_sign(3, np.random.default_rng(5))
    assert np.array_equal(a, b) and ra == rb


def test_bad_class_rejected():
    with pytest.raises(ValueError):
        render_sign(NUM_CLASSES, np.random.default_rng(0))
    with pytest.raises(ValueError):
        generate(1, seed=0, classes=[-1])
