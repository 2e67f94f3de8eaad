"""In-plane pairs from a thick-only series (issue 14): geometry and the slice profile along the swapped axis."""

from __future__ import annotations

import numpy as np
import pytest

from ctld.data.inplane import inplane_pair, inplane_pairs, resample_axis
from ctld.data.transforms import simulate_thick, slice_profile_weights


def _series(depth=6, height=50, width=40, seed=0) -> np.ndarray:
    """A thick series whose HU is a known function of position: a ramp in y plus per-slice noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    return (rng.integers(-200, 200, size=(depth, 1, 1)) + 7 * y + np.sin(x / 3.0) * 50).astype(np.int16)


@pytest.mark.parametrize("profile", ["box", "gaussian"])
def test_inplane_pair_geometry_and_profile_along_the_swapped_axis(profile):
    hu, spacing = _series(), (5.0, 0.5, 0.8)
    pair = inplane_pair(hu, spacing, axis="y", factor=5, profile=profile)
    # y (50 px at 0.5 mm = 24.5 mm) resampled to about 1 mm (dz / factor): 25 samples, cut to a multiple of 5.
    assert pair.thin_hu.shape == (25, 6, 40) and pair.thick_hu.shape == (5, 6, 40)
    assert pair.thin_spacing_mm == pytest.approx((24.5 / 24, 5.0, 0.8))
    assert pair.thick_spacing_mm == pytest.approx((5 * 24.5 / 24, 5.0, 0.8))
    # The thin side is the series resampled along y: a ramp of 7 HU per 0.5 mm pixel = 14 HU/mm.
    slope = np.diff(pair.thin_hu[:, 2, 0].astype(float)) / pair.thin_spacing_mm[0]
    assert np.allclose(slope, 14.0, atol=1.5)
    assert np.array_equal(pair.thin_hu[0], hu[:, 0, :])  # corner-aligned: row 0 is kept
    # The thick side is the profile-weighted average of factor thin samples along the swapped axis.
    assert np.array_equal(pair.thick_hu, simulate_thick(pair.thin_hu, 5, profile))
    positions, weights = slice_profile_weights(5, profile)
    k = 2
    index = k * 5 + positions.astype(int)
    expected = np.tensordot(weights / weights.sum(), pair.thin_hu[index].astype(float), axes=(0, 0))
    assert np.abs(pair.thick_hu[k] - expected).max() <= 0.5


def test_both_axes_and_refusals():
    hu = _series()
    pairs = inplane_pairs(hu, (5.0, 0.5, 0.8), factor=5)
    assert [p.axis for p in pairs] == ["y", "x"]
    x_pair = pairs[1]  # x: 40 px at 0.8 mm = 31.2 mm -> 32 samples at 1.0 mm -> 30 kept; in-plane (D, H)
    assert x_pair.thin_hu.shape == (30, 6, 50) and x_pair.thin_spacing_mm[1:] == (5.0, 0.5)
    assert np.array_equal(x_pair.thin_hu[0], hu[:, :, 0])
    with pytest.raises(ValueError, match="fewer than 5"):
        inplane_pair(hu[:, :4, :], (5.0, 0.5, 0.8), axis="y", factor=5)
    with pytest.raises(ValueError, match="in-plane axis"):
        inplane_pair(hu, (5.0, 0.5, 0.8), axis="z", factor=5)


def test_resample_axis_keeps_the_ends_and_reports_the_exact_spacing():
    ramp = np.arange(11, dtype=np.float32)[None, :, None] * np.ones((2, 1, 3), np.float32)
    out, spacing = resample_axis(ramp, 1, 0.7, 1.0)  # 7 mm -> 8 samples at 1 mm
    assert out.shape == (2, 8, 3) and spacing == pytest.approx(1.0)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == pytest.approx(10)


def test_shard_builder_turns_a_thick_only_series_into_inplane_pairs(tmp_path):
    """`ctld-shards build --pairs inplane`: a thick series without a thin partner gives two samples (axes y and x)
    recorded as in-plane pairs; without the flag it stays unused."""
    from conftest import synthetic_ct

    from ctld.data import build_shards
    from ctld.data.dicom_write import write_dicom_series
    from ctld.data.shards import iter_samples, manifest_shards, read_manifest
    from ctld.data.volume import Volume

    thick = Volume(synthetic_ct(12, 40, seed=3), (5.0, 0.625, 0.625), (0.0, 0.0, 0.0), np.eye(3))
    write_dicom_series(thick, tmp_path / "dicom" / "thick", patient={"PatientName": "SYNTH^THICK", "PatientID": "T1"})
    common = ["build", str(tmp_path / "dicom"), "--shards.salt=s", "--shards.val_fraction=0",
              "--shards.test_fraction=0", "--shards.num_workers=1", "--log_level=ERROR"]
    assert build_shards.main([*common, "--out", str(tmp_path / "through")]) in (0, 1)
    assert read_manifest(tmp_path / "through")["samples"] == 0
    assert build_shards.main([*common, "--out", str(tmp_path / "inplane"), "--pairs", "inplane"]) == 0
    manifest = read_manifest(tmp_path / "inplane")
    assert manifest["thick_source"] == {"inplane": 2} and not manifest["unused"]
    samples = {s["meta"]["inplane_axis"]: s for s in iter_samples(manifest_shards(tmp_path / "inplane", "train"))}
    assert set(samples) == {"y", "x"}
    for sample in samples.values():
        # 40 px at 0.625 mm = 24.4 mm -> about 1 mm (5 mm / factor 5): 25 samples, 25 kept; rows = the 12 slices.
        assert sample["thin"].shape == (25, 12, 40) and sample["thick"].shape == (5, 12, 40)
        assert sample["meta"]["thin_spacing_mm"][1:] == [5.0, 0.625] and sample["offset"] == 0
        assert np.array_equal(sample["thick"], simulate_thick(sample["thin"], 5, "box"))
    assert np.array_equal(samples["y"]["thin"][0], thick.hu[:, 0, :])  # the first row of every slice
