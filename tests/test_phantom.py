"""The procedural chest CT phantom: tissue HU, determinism, findings, DICOM round trip, thick = slab mean."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ctld.data.dicom import read_dicom_series
from ctld.data.transforms import simulate_thick
from ctld.demo.phantom import Tissue, make_cohort, make_phantom, thick_volume


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(7)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return out, make_cohort(out, 2, seed=3, num_slices=40, size=64)


@pytest.mark.parametrize(
    "tissue, lo, hi",
    [
        (Tissue.AIR, -1024, -960),
        (Tissue.FAT, -130, -60),
        (Tissue.MUSCLE, 25, 75),
        (Tissue.LUNG, -890, -800),
        (Tissue.SOFT_TISSUE, 25, 100),
        (Tissue.BLOOD, 180, 450),
        (Tissue.BONE, 550, 800),
        (Tissue.AIRWAY, -1024, -900),
    ],
)
def test_tissue_hu_ranges(phantom, tissue, lo, hi):
    core = ndimage.binary_erosion(phantom.labels == tissue)  # away from partial-volume edges
    assert core.sum() > 100, f"{tissue.name} is (nearly) missing"
    median = float(np.median(phantom.hu[core]))
    assert lo <= median <= hi, f"{tissue.name} median {median} HU outside [{lo}, {hi}]"


def test_bone_cortex_brighter_and_shape(phantom):
    cortex = phantom.hu[phantom.labels == Tissue.CORTEX]
    bone = phantom.hu[ndimage.binary_erosion(phantom.labels == Tissue.BONE)]
    assert np.percentile(cortex, 90) > 1000
    assert np.median(cortex) > np.median(bone) + 150
    assert phantom.hu.dtype == np.int16 and phantom.hu.shape == (100, 128, 128)
    assert phantom.hu.min() >= -1024


def test_findings_are_where_they_say(phantom):
    kinds = [f["kind"] for f in phantom.findings]
    assert any(k.endswith("nodule") for k in kinds) and "embolus" in kinds
    for finding in phantom.findings:
        k, j, i = finding["index"]
        value = float(phantom.hu[k, j, i])
        if finding["kind"] == "nodule":
            assert value > -200, finding  # solid, surrounded by ~-850 HU lung
        elif finding["kind"] == "ground_glass_nodule":
            assert -750 < value < -300, finding
        else:
            assert value < 200, finding  # a filling defect darker than the ~330 HU contrast around it
            around = phantom.hu[k, max(j - 4, 0) : j + 5, max(i - 4, 0) : i + 5]
            assert around.max() > 250, finding


def test_noise_level_and_correlation():
    clean = make_phantom(11, noise_hu=0.0)
    noisy = make_phantom(11, noise_hu=15.0)
    np.testing.assert_array_equal(clean.labels, noisy.labels)
    body = ndimage.binary_erosion(clean.labels != Tissue.AIR, iterations=3)
    noise = noisy.hu.astype(np.float64) - clean.hu
    assert 11.0 < noise[body].std() < 19.0
    # Correlated, like reconstructed CT noise: neighbouring pixels share part of it.
    corr = np.corrcoef(noise[:, :, :-1][body[:, :, :-1]], noise[:, :, 1:][body[:, :, :-1]])[0, 1]
    assert corr > 0.3


def test_same_seed_same_phantom_other_seed_differs():
    a, b, c = (
        make_phantom(5, num_slices=30, size=64),
        make_phantom(5, num_slices=30, size=64),
        make_phantom(6, num_slices=30, size=64),
    )
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.findings == b.findings
    assert np.abs(a.hu.astype(np.int32) - c.hu).mean() > 20


def test_z_structure_defeats_linear_interpolation():
    """Small oblique vessels, nodules and ribs change within a 5 mm slab: linear interpolation from the thick
    slices must leave a clear error inside the lungs (otherwise the phantom would teach ctld nothing)."""
    clean = make_phantom(2, noise_hu=0.0)
    thin = clean.hu.astype(np.float64)
    thick = simulate_thick(clean.hu, 5).astype(np.float64)
    centres = np.arange(thick.shape[0]) * 5 + 2.0
    z = np.arange(thick.shape[0] * 5, dtype=np.float64)
    upper = np.clip(np.searchsorted(centres, z), 1, len(centres) - 1)
    weight = np.clip((z - centres[upper - 1]) / 5.0, 0, 1)[:, None, None]
    linear = thick[upper - 1] * (1 - weight) + thick[upper] * weight
    lung = clean.labels[: len(z)] == Tissue.LUNG
    error = np.abs(linear - thin[: len(z)])[ndimage.binary_dilation(lung)]
    assert error.mean() > 25.0


def test_bad_sizes_fail():
    with pytest.raises(ValueError, match="num_slices"):
        make_phantom(0, num_slices=4)
    with pytest.raises(ValueError, match="n_studies"):
        make_cohort("unused", 0, seed=0)


def test_cohort_dicom_reads_back_with_geometry(cohort):
    out, studies = cohort
    assert [s.thick_dir is not None for s in studies] == [True, False]
    record = json.loads((out / "phantoms.json").read_text())
    assert [s["study_dir"] for s in record["studies"]] == ["PHANTOM_001", "PHANTOM_002"]

    first = studies[0]
    expected = make_phantom(first.seed, num_slices=40, size=64)
    volumes = read_dicom_series(first.study_dir, salt="test")
    thin = next(v for v in volumes if v.spacing_mm[0] == pytest.approx(1.0))
    thick = next(v for v in volumes if v.spacing_mm[0] == pytest.approx(5.0))
    np.testing.assert_array_equal(thin.hu, expected.hu)
    assert thin.spacing_mm == pytest.approx((1.0, 1.5, 1.5))
    assert thin.origin_mm == pytest.approx(expected.origin_mm)
    np.testing.assert_allclose(thin.direction, np.eye(3), atol=1e-6)
    assert thick.study_id == thin.study_id and thick.series_id != thin.series_id

    # Thick = mean of its 5 thin slices, placed at the slab centre (docs/DESIGN.md, Geometry convention).
    np.testing.assert_array_equal(thick.hu, simulate_thick(thin.hu, 5))
    thin_z = thin.slice_positions_mm()[:, 2]
    thick_z = thick.slice_positions_mm()[:, 2]
    np.testing.assert_allclose(thick_z, thin_z[: len(thick_z) * 5].reshape(-1, 5).mean(axis=1), atol=1e-4)
    assert thick.meta["slice_thickness_mm"] == pytest.approx(5.0)


def test_cohort_carries_fake_identifiers_to_catch(cohort):
    _, studies = cohort
    ds = pydicom.dcmread(sorted(studies[1].thin_dir.glob("*.dcm"))[0])
    assert str(ds.PatientName) == "PHANTOM^002"
    assert ds.PatientID and ds.PatientBirthDate and ds.AccessionNumber and ds.InstitutionName
    assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.RescaleSlope == 1 and ds.RescaleIntercept == 0


def test_thick_volume_positions():
    p = make_phantom(1, num_slices=23, size=48)
    thin = p.volume()
    thick = thick_volume(thin, 5)
    assert thick.hu.shape == (4, 48, 48)  # trailing 3 slices do not fill a slab
    assert thick.origin_mm[2] == pytest.approx(thin.origin_mm[2] + 2.0)
