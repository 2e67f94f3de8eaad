"""Patch sampling and augmentation (ctld/data/patches.py): alignment, padding, symmetry, foreground bias."""

from __future__ import annotations

import numpy as np
import pytest

from ctld.data.geometry import covered_pair
from ctld.data.patches import (
    AIR_HU,
    DIHEDRAL,
    augment_pair,
    collate_patches,
    crop_with_fill,
    dihedral,
    extract_patch_pair,
    foreground_fraction,
    sample_patch_pairs,
    sample_patch_pairs_d,
)
from ctld.data.transforms import hu_to_int16, model_to_hu, simulate_thick

FACTOR = 5


def random_hu(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-1024, 2049, size=shape).astype(np.int16)


def slab_means(thin_patch: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """The thick slices a simulated pair would have: rounded means of consecutive thin slabs."""
    return simulate_thick(thin_patch, factor)


@pytest.mark.parametrize("offset", [0, 3, 7, -2, -6])
def test_covered_pair_aligns_thick_slice_k_with_its_thin_slab(offset):
    rng = np.random.default_rng(0)
    core = random_hu(rng, (30, 6, 5))  # 6 whole slabs
    thick = simulate_thick(core, FACTOR)
    # Build thin so that thick slice k covers thin [offset + k*f, offset + (k+1)*f): shift core by offset.
    if offset >= 0:
        thin = np.concatenate([random_hu(rng, (offset, 6, 5)), core, random_hu(rng, (4, 6, 5))])
    else:
        thin = core[-offset:]  # the first slab(s) lose slices: those thick slices are not covered
    thick_c, thin_c = covered_pair(thick, thin, factor=FACTOR, offset=offset)
    assert thin_c.shape[0] == thick_c.shape[0] * FACTOR
    np.testing.assert_array_equal(slab_means(thin_c), thick_c)
    expected_depth = 6 if offset >= 0 else 6 - (-offset + FACTOR - 1) // FACTOR
    assert thick_c.shape[0] == expected_depth


def test_covered_pair_rejects_different_in_plane_grids():
    with pytest.raises(ValueError, match="in-plane"):
        covered_pair(np.zeros((2, 4, 4), np.int16), np.zeros((10, 4, 5), np.int16), factor=5, offset=0)


def test_crop_with_fill_pads_outside_and_copies_inside():
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    out = crop_with_fill(volume, (-1, 1, 2), (4, 3, 3))
    assert out.shape == (4, 3, 3)
    np.testing.assert_array_equal(out[1:3, :2, :2], volume[:, 1:3, 2:4])
    assert (out[0] == AIR_HU).all() and (out[3] == AIR_HU).all() and (out[:, 2] == AIR_HU).all()
    assert (out[:, :, 2] == AIR_HU).all()
    out[1, 0, 0] = 999  # a copy, never a view of the source
    assert volume[0, 1, 2] != 999


def test_extract_patch_pair_thick_equals_slab_means_of_thin():
    rng = np.random.default_rng(1)
    thin = random_hu(rng, (40, 24, 20))
    thick = simulate_thick(thin, FACTOR)
    thick_patch, thin_patch = extract_patch_pair(
        thick, thin, factor=FACTOR, origin=(3, 5, 2), depth_thick=4, patch_size=16
    )
    assert thick_patch.shape == (4, 16, 16) and thin_patch.shape == (20, 16, 16)
    np.testing.assert_array_equal(thin_patch, thin[15:35, 5:21, 2:18])
    np.testing.assert_array_equal(thick_patch, thick[3:7, 5:21, 2:18])
    np.testing.assert_array_equal(slab_means(thin_patch), thick_patch)


def test_small_volume_is_padded_with_air_on_both_alike():
    rng = np.random.default_rng(2)
    thin = random_hu(rng, (10, 7, 9))  # 2 thick slices, 7x9 in-plane: smaller than 4x16x16 everywhere
    thick = simulate_thick(thin, FACTOR)
    pairs = sample_patch_pairs(
        thick, thin, factor=FACTOR, offset=0, depth_thick=4, patch_size=16, count=6, rng=rng, small_volume="pad"
    )
    for thick_patch, thin_patch, (k0, y0, x0) in pairs:
        assert -2 <= k0 <= 0 and -9 <= y0 <= 0 and -7 <= x0 <= 0
        np.testing.assert_array_equal(slab_means(thin_patch), thick_patch)
        # Exactly the volume's voxels are non-air: the rest is padding.
        inside = thick_patch[-k0 : -k0 + 2, -y0 : -y0 + 7, -x0 : -x0 + 9]
        np.testing.assert_array_equal(inside, thick)
        assert (thick_patch == AIR_HU).sum() == thick_patch.size - thick.size + (thick == AIR_HU).sum()


def test_small_volume_skip_returns_none_and_fitting_volume_is_kept():
    rng = np.random.default_rng(3)
    thin = random_hu(rng, (20, 15, 30))  # 4 thick slices, but 15 < 16 rows
    thick = simulate_thick(thin, FACTOR)
    kwargs = {"factor": FACTOR, "offset": 0, "depth_thick": 4, "count": 2, "rng": rng, "small_volume": "skip"}
    assert sample_patch_pairs(thick, thin, patch_size=16, **kwargs) is None
    assert len(sample_patch_pairs(thick, thin, patch_size=15, **kwargs)) == 2


def test_no_covered_slice_is_skipped_even_in_pad_mode():
    thin = np.zeros((4, 8, 8), np.int16)  # less than one slab
    thick = np.zeros((1, 8, 8), np.int16)
    rng = np.random.default_rng(0)
    assert sample_patch_pairs(thick, thin, factor=5, offset=0, depth_thick=1, patch_size=8, count=1, rng=rng) is None


def test_dihedral_gives_eight_distinct_symmetries_and_keeps_depth():
    volume = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    images = {dihedral(volume, *element).tobytes() for element in DIHEDRAL}
    assert len(images) == 8
    for element in DIHEDRAL:
        out = dihedral(volume, *element)
        for z in range(2):  # slices stay slices: only the in-plane layout changes
            assert sorted(out[z].ravel()) == sorted(volume[z].ravel())


def test_augmentation_is_identical_on_thick_and_thin():
    rng = np.random.default_rng(4)
    thin_patch = random_hu(rng, (20, 16, 16))
    thick_patch = slab_means(thin_patch)
    seen = set()
    for _ in range(40):
        thick_aug, thin_aug = augment_pair(thick_patch, thin_patch, rng)
        np.testing.assert_array_equal(slab_means(thin_aug), thick_aug)
        seen.add(thick_aug.tobytes())
    assert len(seen) == 8  # every symmetry is drawn


def test_sampled_patches_are_aligned_with_augmentation_and_offset():
    rng = np.random.default_rng(5)
    core = random_hu(rng, (50, 40, 36))
    thin = np.concatenate([random_hu(rng, (3, 40, 36)), core])  # offset 3
    thick = simulate_thick(core, FACTOR)
    sample = {"__key__": "case_series", "thick": thick, "thin": thin, "factor": FACTOR, "offset": 3}
    patches = sample_patch_pairs_d(sample, rng=rng, depth_thick=4, patch_size=16, count=12, augment=True)
    assert len(patches) == 12
    for patch in patches:
        k0, y0, x0 = patch["origin"]
        np.testing.assert_array_equal(slab_means(patch["thin"]), patch["thick"])
        source = core[k0 * FACTOR : (k0 + 4) * FACTOR, y0 : y0 + 16, x0 : x0 + 16]
        assert any(np.array_equal(dihedral(source, *element), patch["thin"]) for element in DIHEDRAL)


def test_foreground_bias_avoids_air_crops():
    rng = np.random.default_rng(6)
    thin = np.full((20, 96, 96), AIR_HU, np.int16)
    thin[:, 60:90, 60:90] = 40  # a small soft-tissue block in a sea of air
    thick = simulate_thick(thin, FACTOR)
    kwargs = {"factor": FACTOR, "offset": 0, "depth_thick": 4, "patch_size": 32, "count": 30, "rng": rng}
    biased = sample_patch_pairs(thick, thin, min_foreground_fraction=0.1, max_tries=20, **kwargs)
    unbiased = sample_patch_pairs(thick, thin, **kwargs)
    assert all(foreground_fraction(thick_patch) >= 0.1 for thick_patch, _, _ in biased)
    assert sum(foreground_fraction(thick_patch) == 0 for thick_patch, _, _ in unbiased) > 5


def test_foreground_fraction_counts_lung_but_not_air():
    patch = np.full((2, 8, 8), -1000, np.int16)
    assert foreground_fraction(patch) == 0.0
    patch[:] = -800  # lung parenchyma
    assert foreground_fraction(patch) == 1.0


def test_collated_batch_inverts_exactly_to_hu():
    rng = np.random.default_rng(7)
    patches = [
        {"__key__": f"k{i}", "thick": random_hu(rng, (2, 8, 8)), "thin": random_hu(rng, (10, 8, 8))} for i in range(3)
    ]
    batch = collate_patches(patches, hu_min=-1024.0, hu_max=2048.0)
    assert batch["thick"].shape == (3, 1, 2, 8, 8) and batch["thin"].shape == (3, 1, 10, 8, 8)
    assert batch["key"] == ["k0", "k1", "k2"]
    for i, patch in enumerate(patches):
        for name in ("thick", "thin"):
            x = batch[name][i, 0]
            assert x.dtype.is_floating_point and x.abs().max() <= 1.0
            np.testing.assert_array_equal(hu_to_int16(model_to_hu(x, -1024.0, 2048.0)), patch[name])
