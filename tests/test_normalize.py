"""Intensity normalisation, checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medsam.intensity import (
    CT_WINDOWS,
    KNOWN_MODALITIES,
    Window,
    minmax_to_uint8,
    normalize_image,
    normalize_percentile,
    window_ct,
)


def test_ct_windows_table():
    assert CT_WINDOWS["soft_tissue"] == (40, 400)
    assert CT_WINDOWS["lung"] == (-600, 1500)
    assert CT_WINDOWS["brain"] == (40, 80)
    assert set(CT_WINDOWS) == {"soft_tissue", "lung", "brain", "bone", "liver"}


def test_window_ct_hand_values():
    # soft tissue: window [-160, 240]; y = (x + 160) * 255 / 400, truncated
    hu = np.array([-1000, -160, -60, 40, 100, 240, 3000], dtype=np.int16)
    out = window_ct(hu, 40, 400)
    assert out.dtype == np.uint8
    # -60 -> 63.75, 40 -> 127.5, 100 -> 165.75
    np.testing.assert_array_equal(out, [0, 0, 63, 127, 165, 255, 255])
    # lung: window [-1350, 150]; -600 -> 750 * 255 / 1500 = 127.5
    np.testing.assert_array_equal(window_ct(np.array([-2000.0, -600.0, 150.0]), -600, 1500), [0, 127, 255])
    assert window_ct(np.zeros((2, 3, 4)), 40, 400).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="width"):
        window_ct(hu, 40, 0)


def test_window_value_type():
    assert Window.parse("Soft tissue") == Window.parse("soft-tissue") == Window(40, 400)
    assert Window.parse([50, "100"]) == Window(50.0, 100.0)
    assert (Window(40, 400).lo, Window(40, 400).hi) == (-160.0, 240.0)
    for bad in ("abdomen", (1, 2, 3), (40, 0), (float("nan"), 10), (1.7e308, 1e308), None):
        with pytest.raises(ValueError):
            Window.parse(bad)
    hu = np.array([np.nan, np.inf, -np.inf, -60.0])
    with pytest.raises(ValueError, match="NaN"):
        Window(40, 400).to_uint8(hu)
    # a display shows NaN as the window's bottom and +-inf as its ends
    np.testing.assert_array_equal(Window(40, 400).to_uint8(hu, nonfinite="saturate"), [0, 255, 0, 63])
    # the model input and the display map the same HU to the same grey
    ramp = np.linspace(-300, 300, 601)
    np.testing.assert_array_equal(
        Window(40, 400).to_uint8(ramp, nonfinite="saturate"), normalize_image(ramp, "CT", window="soft_tissue")
    )


def test_minmax_hand_values():
    # lo -2, hi 8: y = round((x + 2) * 25.5)
    arr = np.array([[-2.0, 0.0], [3.0, 8.0]])
    np.testing.assert_array_equal(minmax_to_uint8(arr), [[0, 51], [128, 255]])
    vol = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # slab-wise equals whole-array math
    np.testing.assert_array_equal(minmax_to_uint8(vol), np.round(vol.astype(np.float64) * 255 / 23).astype(np.uint8))
    np.testing.assert_array_equal(minmax_to_uint8(np.full((2, 2), 7.0)), np.zeros((2, 2)))
    np.testing.assert_array_equal(minmax_to_uint8(np.array([True, False])), [255, 0])
    with pytest.raises(ValueError, match="NaN"):
        minmax_to_uint8(np.array([1.0, np.nan]))


def test_percentile_hand_values():
    # foreground 1..201: 0.5th percentile = 1 + 0.005 * 200 = 2, 99.5th = 1 + 0.995 * 200 = 200
    arr = np.concatenate([np.zeros(10), np.arange(1, 202), [-5.0]])
    out = normalize_percentile(arr)
    assert out.dtype == np.uint8
    assert np.all(out[:10] == 0)  # original zeros stay 0
    fg = out[10:211]
    assert fg[0] == 0 and fg[1] == 0  # 1 -> clipped to 2 -> 0; 2 -> 0
    assert fg[100] == 127  # 101: (101 - 2) * 255 / 198 = 127.5
    assert fg[51] == 64  # 52: (52 - 2) * 255 / 198 = 64.39
    assert fg[-1] == 255 and fg[-2] == 255  # 201 clipped to 200; 200 -> 255
    assert out[-1] == 0  # negative: clipped up to the lower bound
    np.testing.assert_array_equal(fg, np.floor((np.clip(np.arange(1, 202), 2, 200) - 2) * 255 / 198))


def test_percentile_custom_bounds_and_degenerate():
    arr = np.array([0, 10, 20, 30, 40], float)
    # lower=0, upper=100 over 10..40: y = (x - 10) * 255 / 30
    np.testing.assert_array_equal(normalize_percentile(arr, 0, 100), [0, 0, 85, 170, 255])
    np.testing.assert_array_equal(normalize_percentile(np.zeros((3, 3))), np.zeros((3, 3)))
    np.testing.assert_array_equal(normalize_percentile(np.array([0, 7, 7.0])), [0, 255, 255])
    with pytest.raises(ValueError, match="lower"):
        normalize_percentile(arr, 50, 10)


def test_normalize_image_ct_dispatch():
    hu = np.array([[-1000, 40], [240, -600]], dtype=np.int16)
    np.testing.assert_array_equal(normalize_image(hu, "CT"), window_ct(hu, 40, 400))
    np.testing.assert_array_equal(normalize_image(hu, "ct", window="lung"), window_ct(hu, -600, 1500))
    np.testing.assert_array_equal(normalize_image(hu, "CT", window=(50, 100)), window_ct(hu, 50, 100))
    # a CT volume whose last axis happens to be 3 is not taken for colour
    assert normalize_image(np.zeros((4, 5, 3)), "CT").shape == (4, 5, 3)
    with pytest.raises(ValueError, match="soft_tissue"):
        normalize_image(hu, "CT", window="abdomen")
    with pytest.raises(ValueError, match="level, width"):
        normalize_image(hu, "CT", window=(1, 2, 3))


def test_normalize_image_grey_modalities_use_percentile():
    rng = np.random.default_rng(0)
    arr = rng.gamma(2.0, 100.0, (6, 7, 8))
    arr[0] = 0
    expected = normalize_percentile(arr)
    for m in ("MR", "MRI", "PET", "PT", "US", "XRay", "x-ray", "CR", "Mammography", "OCT"):
        np.testing.assert_array_equal(normalize_image(arr, m), expected)
    with pytest.raises(ValueError, match="only applies to CT"):
        normalize_image(arr, "MR", window="brain")


def test_normalize_image_colour():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    for m in ("Endoscopy", "Fundus", "Dermoscopy", "Microscopy"):
        out = normalize_image(rgb, m)
        assert out.dtype == np.uint8 and out.shape == (5, 6, 3)
        np.testing.assert_array_equal(out, rgb)  # already uint8: untouched
    # float colour: per-channel min-max, truncated
    img = np.zeros((1, 3, 3))
    img[0, :, 0] = [0.0, 0.5, 1.0]  # -> 0, 127, 255
    img[0, :, 1] = [10, 20, 40]  # -> 0, 85, 255
    img[0, :, 2] = 3.0  # constant channel -> 0
    out = normalize_image(img, "microscopy")
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [127, 85, 0], [255, 255, 0]])
    rgba = np.dstack([rgb, np.full((5, 6), 255, np.uint8)])
    np.testing.assert_array_equal(normalize_image(rgba, "Fundus"), rgb)
    # grey input of a colour modality: percentile recipe, stays grey
    grey = np.arange(1, 13, dtype=float).reshape(3, 4)
    assert normalize_image(grey, "Endoscopy").shape == (3, 4)


def test_normalize_image_errors():
    with pytest.raises(ValueError) as info:
        normalize_image(np.zeros((3, 3)), "Ultrasonography")
    for name in KNOWN_MODALITIES:
        assert name in str(info.value)
    bad = np.ones((3, 3))
    bad[1, 1] = np.nan
    for m in ("CT", "MR", "Microscopy"):
        with pytest.raises(ValueError, match="NaN"):
            normalize_image(bad if m != "Microscopy" else np.dstack([bad] * 3), m)
    with pytest.raises(ValueError, match="NaN"):
        window_ct(bad, 40, 400)
