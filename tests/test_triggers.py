import numpy as np
import pytest

from signtrap.attacks.triggers import make_trigger, place, stamp
from signtrap.config import load_config
from signtrap.errors import ConfigError

KINDS = ("checkerboard", "yellow_square", "white_square", "noise")


def trigger(*overrides, size=32):
    return make_trigger(load_config(None, list(overrides)).trigger, size)


@pytest.mark.parametrize("kind", KINDS)
def test_stamp_changes_exactly_the_masked_pixels(kind):
    trig = trigger(f"trigger.kind={kind}", "trigger.size=6")
    images = np.full((3, 32, 32, 3), 77, np.uint8)
    positions = np.array([[0, 0], [10, 20], [26, 26]])
    out = stamp(images, trig, positions)
    assert out.dtype == np.uint8 and images[0, 0, 0, 0] == 77  # input untouched
    for image, (y, x) in zip(out, positions):
        mask = np.zeros((32, 32), bool)
        mask[y:y + 6, x:x + 6] = trig.alpha > 0
        changed = (image != 77).any(axis=2)
        assert not changed[~mask].any()
        np.testing.assert_array_equal(image[y:y + 6, x:x + 6][trig.alpha == 1], trig.pattern[trig.alpha == 1])


def test_batch_and_single_image_agree():
    trig = trigger("trigger.kind=noise", "trigger.opacity=0.6")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    positions = rng.integers(0, 27, (5, 2))
    batch = stamp(images, trig, positions)
    for i in range(5):
        np.testing.assert_array_equal(batch[i], stamp(images[i], trig, positions[i]))


def test_opacity_blends():
    trig = trigger("trigger.kind=white_square", "trigger.size=4", "trigger.opacity=0.5")
    out = stamp(np.zeros((32, 32, 3), np.uint8), trig, np.array([0, 0]))
    assert set(np.unique(out[:4, :4])) == {128}


def test_size_in_pixels_or_fraction_and_too_large():
    assert trigger("trigger.size=7").shape == (7, 7)
    assert trigger("trigger.size=0.25").shape == (8, 8)
    with pytest.raises(ConfigError, match="does not fit"):
        trigger("trigger.size=40")


def test_placements_stay_inside_image_and_sign():
    rng = np.random.default_rng(0)
    corner = trigger("trigger.size=5", "trigger.corner=top_left", "trigger.margin=2")
    assert (place(corner, 3, 32, rng) == [[2, 2]] * 3).all()
    rand = trigger("trigger.size=5", "trigger.placement=random")
    pos = place(rand, 500, 32, rng)
    assert pos.min() >= 1 and pos.max() <= 32 - 5 - 1 and len(np.unique(pos, axis=0)) > 50
    on_sign = trigger("trigger.size=5", "trigger.placement=on_sign")
    rois = np.tile([8, 10, 24, 26], (200, 1))
    pos = place(on_sign, 200, 32, rng, rois)
    assert (pos[:, 1] >= 8).all() and (pos[:, 1] + 5 <= 24).all() and (pos[:, 0] >= 10).all() and (pos[:, 0] + 5 <= 26).all()


def test_sticker_png_with_alpha(tmp_path):
    import cv2

    sticker = np.zeros((20, 20, 4), np.uint8)
    sticker[..., 2] = 255  # red in BGR
    sticker[5:15, 5:15, 3] = 255  # opaque centre, transparent border
    cv2.imwrite(str(tmp_path / "s.png"), sticker)
    trig = trigger("trigger.kind=sticker", f"trigger.sticker={tmp_path / 's.png'}", "trigger.size=10")
    assert trig.alpha[0, 0] == 0 and trig.alpha[5, 5] == 1 and tuple(trig.pattern[5, 5]) == (255, 0, 0)
    out = stamp(np.zeros((32, 32, 3), np.uint8), trig, np.array([0, 0]))
    assert out[0, 0].sum() == 0 and tuple(out[5, 5]) == (255, 0, 0)
