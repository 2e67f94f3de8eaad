from __future__ import annotations

import numpy as np
import pytest
import torch

from ctld.data.transforms import (
    hu_to_int16,
    hu_to_model,
    model_to_hu,
    simulate_thick,
    slice_profile_weights,
    window_to_unit,
)


def test_intensity_inverse_is_exact_for_integer_hu():
    hu = np.arange(-1024, 2049, dtype=np.int16)
    x = hu_to_model(hu, -1024.0, 2048.0)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(hu_to_int16(model_to_hu(x, -1024.0, 2048.0)), hu)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_hu_to_int16_refuses_non_finite_values(bad):
    """Issue 15: NaN/Inf used to be cast silently (NaN became -32768 or 0) into the written series."""
    hu = np.zeros((2, 3, 4))
    hu[1, 2, 3] = bad
    hu[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"2 of 24 voxels are not finite.*diverged"):
        hu_to_int16(hu)
    with pytest.raises(ValueError, match=r"2 of 24 voxels are not finite"):
        hu_to_int16(torch.from_numpy(hu))
    np.testing.assert_array_equal(hu_to_int16(np.array([-40000.0, 1.4, 40000.0])), [-32768, 1, 32767])  # saturates


def test_intensity_torch_matches_numpy():
    hu = np.random.default_rng(0).integers(-2000, 3000, size=(4, 8, 8)).astype(np.int16)
    np.testing.assert_allclose(hu_to_model(torch.from_numpy(hu), -1024, 2048).numpy(), hu_to_model(hu, -1024, 2048))


def test_intensity_clips_outside_window():
    x = hu_to_model(np.array([-3000, 5000], dtype=np.int16), -1024, 2048)
    np.testing.assert_array_equal(x, [-1.0, 1.0])


def test_bad_window_raises():
    with pytest.raises(ValueError, match="hu_max"):
        hu_to_model(np.zeros(3), 10, 10)


def test_window_to_unit():
    np.testing.assert_allclose(window_to_unit(np.array([-160, 40, 240, 1000]), -160, 240), [0, 0.5, 1, 1])


def test_simulate_thick_is_slab_mean():
    thin = np.arange(11 * 2 * 2, dtype=np.int16).reshape(11, 2, 2)
    thick = simulate_thick(thin, 5)
    assert thick.shape == (2, 2, 2)
    np.testing.assert_array_equal(thick[1], np.rint(thin[5:10].mean(axis=0)).astype(np.int16))
    with pytest.raises(ValueError, match="at least factor"):
        simulate_thick(thin[:3], 5)


@pytest.mark.parametrize("profile", ["box", "gaussian", "triangle"])
def test_thick_profiles_keep_mean_hu(profile):
    """Weights sum to 1 with FWHM = one slab; a constant keeps its HU, and a smooth volume keeps its mean HU
    (away from the ends, where the profile is cut)."""
    positions, weights = slice_profile_weights(5, profile)
    assert weights.sum() == pytest.approx(1.0)
    assert np.average(positions, weights=weights) == pytest.approx(2.0)  # centred on the slab's middle slice
    constant = np.full((20, 3, 3), -37, dtype=np.int16)
    np.testing.assert_array_equal(simulate_thick(constant, 5, profile), -37)
    z = np.arange(200, dtype=np.float64)
    smooth = (300.0 * np.sin(z / 15.0) + 40.0)[:, None, None] * np.ones((1, 2, 2))
    thick = simulate_thick(smooth, 5, profile)
    assert thick.shape == (40, 2, 2)
    assert thick[2:-2].mean() == pytest.approx(smooth[10:-10].mean(), abs=3.0)


def test_thick_profiles_differ_in_width():
    """A single bright thin slice at the edge of a slab: box counts it in its own slab only; gaussian and triangle
    (FWHM = 5 thin slices) also reach the neighbouring thick slice, as a scanner's slice sensitivity profile does."""
    thin = np.zeros((25, 1, 1))
    thin[10] = 1000.0  # the first thin slice of thick slice 2
    box = simulate_thick(thin, 5, "box")[:, 0, 0]
    np.testing.assert_allclose(box, [0, 0, 200, 0, 0])
    for profile in ("gaussian", "triangle"):
        wide = simulate_thick(thin, 5, profile)[:, 0, 0]
        assert wide[2] < 200 and wide[1] > 0 and wide[3] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown thick slice profile"):
        simulate_thick(thin, 5, "lorentz")
