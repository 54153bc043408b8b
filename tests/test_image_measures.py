"""The image measures on synthetic pictures whose answers are known (copylora/reports/image_measures.py)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import lab2rgb, rgb2lab
from skimage.filters import gaussian

from copylora.reports import image_measures
from copylora.reports.image_measures import CHANGED_DELTA_E, compare, heatmap


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """96 x 128 colourful detail everywhere: smoothed colour noise, stretched to the full range."""
    noise = gaussian(np.random.default_rng(0).random((96, 128, 3)), sigma=2, channel_axis=-1)
    return np.round((noise - noise.min()) / (noise.max() - noise.min()) * 255).astype(np.uint8)


def exact_greyscale(rgb: np.ndarray) -> np.ndarray:
    """The same lightness L* with no colour (a* = b* = 0)."""
    lab = rgb2lab(rgb)
    lab[..., 1:] = 0
    return np.round(np.clip(lab2rgb(lab), 0, 1) * 255).astype(np.uint8)


def test_identical_pictures_measure_zero(picture):
    measures, delta_e = compare(picture, picture)
    assert measures.as_dict() == {"structure_kept": 1.0, "delta_e": 0.0, "delta_chroma": 0.0, "changed_share": 0.0}
    assert not delta_e.any() and not heatmap(delta_e).any()  # all black


def test_exact_greyscale_keeps_the_structure_and_loses_the_colour(picture):
    measures, _ = compare(picture, exact_greyscale(picture))
    chroma = np.hypot(*np.moveaxis(rgb2lab(picture)[..., 1:], -1, 0)).mean()
    assert measures.structure_kept >= 0.99
    assert measures.delta_chroma == pytest.approx(-chroma, rel=0.02) and measures.delta_chroma < -15
    assert measures.delta_e > 10 and measures.changed_share > 0.95
    reverse, _ = compare(exact_greyscale(picture), picture)
    assert reverse.delta_chroma == pytest.approx(-measures.delta_chroma)  # signed: colour gained is positive


@pytest.mark.parametrize("moved", [
    lambda p: np.roll(p, 4, axis=1),  # shifted right by 4 pixels
    lambda p: np.roll(p, 5, axis=0),  # down by 5
    lambda p: p[:, ::-1],  # mirrored
], ids=["right4", "down5", "mirrored"])
def test_a_moved_picture_loses_its_structure_everywhere(picture, moved):
    measures, _ = compare(picture, np.ascontiguousarray(moved(picture)))
    assert measures.structure_kept < 0.5
    assert measures.delta_e > 10 and measures.changed_share > 0.95
    assert abs(measures.delta_chroma) < 1  # the same colours, elsewhere


def test_an_edit_in_one_quadrant_is_found_there(picture):
    edited = picture.copy()
    edited[:48, 64:] = 255 - edited[:48, 64:]  # the top right quadrant, inverted
    measures, delta_e = compare(picture, edited)
    assert measures.changed_share == pytest.approx(0.25, abs=0.01)
    lit = heatmap(delta_e).max(axis=-1) > 0
    assert lit[:48, 64:].mean() > 0.99 and not lit[48:].any() and not lit[:, :64].any()
    assert (delta_e[:48, 64:] > CHANGED_DELTA_E).mean() > 0.99


def test_noise_is_small_and_spread(picture):
    noisy = np.clip(picture + np.random.default_rng(1).normal(0, 1, picture.shape), 0, 255).round().astype(np.uint8)
    measures, _ = compare(picture, noisy)
    assert measures.structure_kept > 0.99 and measures.delta_e < 1.5 and abs(measures.delta_chroma) < 0.5


def test_heatmap_scale():
    delta_e = np.array([[0.0, image_measures.HEATMAP_FULL_SCALE / 3, 1e9]])
    assert heatmap(delta_e).tolist() == [[[0, 0, 0], [200, 0, 0], [255, 255, 255]]]
    brightness = heatmap(np.linspace(0, image_measures.HEATMAP_FULL_SCALE, 50)[None]).sum(axis=-1)[0]
    assert (np.diff(brightness) >= 0).all()  # brighter as ΔE grows


def test_signed_numbers_show_no_negative_zero():
    assert [image_measures.signed(v, 2) for v in (-0.001, 0.0, 0.004, -1.256, 3.0)] == [
        "+0.00", "+0.00", "+0.00", "-1.26", "+3.00"]


def test_sizes_must_match_and_fit_the_window(picture):
    with pytest.raises(ValueError, match="sizes differ"):
        compare(picture, picture[:-1])
    with pytest.raises(ValueError, match="smaller than SSIM's 7-pixel window"):
        compare(picture[:6, :6], picture[:6, :6])
