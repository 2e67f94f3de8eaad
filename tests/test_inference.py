from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ctld.baselines import SlabFilter, fit_slab_filter, interpolate_z, interpolation_matrix
from ctld.data.geometry import check_thick_input
from ctld.data.transforms import simulate_thick
from ctld.data.volume import Volume
from ctld.inference import main
from ctld.inferer import interpolate_volume, plan_windows
from ctld.predictors import baseline_predictor
from ctld.series_io import thin_volume_like


def _thick(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int16)


# ---------------------------------------------------------------------------------------------- stitching


@pytest.mark.parametrize(
    "shape, factor, depth_thick, patch, context, overlap, method",
    [
        ((13, 37, 29), 5, 8, 16, 2, 2, "cubic"),  # odd sizes, several depth windows and tiles
        ((11, 20, 47), 3, 6, 12, 2, 1, "cubic"),
        ((3, 10, 11), 5, 8, 16, 2, 2, "cubic"),  # shorter than one window, smaller than one tile
        ((1, 17, 16), 4, 8, 16, 2, 0, "cubic"),  # a single thick slice
        ((20, 40, 33), 5, 6, 16, 1, 0, "linear"),  # linear needs only one context slice
        ((17, 33, 50), 4, 4, 24, 0, 1, "nearest"),  # nearest needs none
    ],
)
def test_windowed_baseline_equals_whole_volume_interpolation(shape, factor, depth_thick, patch, context, overlap,
                                                               method):
    """Stitching is exact: the model swapped for per-window interpolation gives whole-volume interpolation,
    at window borders, volume ends and odd sizes."""
    thick = _thick(shape)
    whole = interpolate_z(thick, factor, method)
    windowed = interpolate_volume(
        thick, baseline_predictor(factor, method), factor=factor, depth_thick=depth_thick, patch_size=patch,
        hu_range=None, depth_context=context, depth_overlap=overlap, inplane_overlap=0.3, batch_size=3,
        progress=False,
    )
    assert windowed.shape == (shape[0] * factor, *shape[1:])
    np.testing.assert_allclose(windowed, whole, atol=2e-3, rtol=0)


def test_too_little_context_breaks_exactness():
    """The check above can fail: cubic taps reach 2 thick slices, so 1 slice of context is not enough."""
    thick = _thick((16, 20, 20))
    windowed = interpolate_volume(thick, baseline_predictor(5, "cubic"), factor=5, depth_thick=6, patch_size=20,
                                  hu_range=None, depth_context=1, depth_overlap=0, progress=False)
    assert np.abs(windowed - interpolate_z(thick, 5, "cubic")).max() > 1.0


@pytest.mark.parametrize("depth_overlap, max_depth_step", [(0, None), (1, 0.2), (2, 0.12)])
def test_blending_hides_seams_between_disagreeing_windows(depth_overlap, max_depth_step):
    """Each window returns its own random constant (as independent diffusion samples disagree): with overlap, the
    output fades from one window to the next instead of jumping; without depth overlap it jumps."""
    rng = np.random.default_rng(0)

    def predict(x: torch.Tensor) -> torch.Tensor:
        levels = torch.from_numpy(rng.uniform(0, 100, size=(x.shape[0], 1, 1, 1, 1)).astype(np.float32))
        return torch.zeros(x.shape[0], 1, x.shape[2] * 5, *x.shape[3:]) + levels

    out = interpolate_volume(np.zeros((30, 200, 200), np.int16), predict, factor=5, depth_thick=8, patch_size=96,
                             hu_range=None, depth_context=2, depth_overlap=depth_overlap, inplane_overlap=0.25,
                             progress=False)
    depth_step = np.abs(np.diff(out, axis=0)).max() / 100
    inplane_step = max(np.abs(np.diff(out, axis=axis)).max() for axis in (1, 2)) / 100
    assert inplane_step < 0.15  # 24 shared pixels, Gaussian weights (a hard seam would step by up to 1)
    if max_depth_step is None:
        assert depth_step > 0.5  # the windows' disagreement shows as a seam
    else:
        assert depth_step < max_depth_step  # linear cross-fade over 5 or 10 thin slices


def test_model_units_round_trip_and_batching():
    """With hu_range, windows reach predict_fn in [-1, 1] and come back as HU; batches never exceed batch_size."""
    thick = np.clip(_thick((9, 30, 30)), -1024, 2048)
    seen = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        assert x.dtype == torch.float32 and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
        return interpolate_z(x, 5, "nearest")

    out = interpolate_volume(thick, predict, factor=5, depth_thick=4, patch_size=16, hu_range=(-1024.0, 2048.0),
                             depth_context=1, depth_overlap=0, batch_size=5, progress=False)
    plan = plan_windows(thick.shape, factor=5, depth_thick=4, patch_size=16, depth_context=1, depth_overlap=0,
                        inplane_overlap=0.25)
    assert sum(seen) == plan.num_windows and max(seen) <= 5
    np.testing.assert_allclose(out, np.repeat(thick, 5, axis=0), atol=0.05)


def test_window_settings_are_checked():
    with pytest.raises(ValueError, match="depth_context"):
        plan_windows((10, 32, 32), factor=5, depth_thick=4, patch_size=16, depth_context=2, depth_overlap=0,
                     inplane_overlap=0.25)
    with pytest.raises(ValueError, match="inplane_overlap"):
        plan_windows((10, 32, 32), factor=5, depth_thick=8, patch_size=16, depth_context=2, depth_overlap=0,
                     inplane_overlap=1.0)
    with pytest.raises(RuntimeError, match="predict_fn returned shape"):
        interpolate_volume(_thick((4, 16, 16)), lambda x: x, factor=5, depth_thick=4, patch_size=16, hu_range=None,
                           depth_context=0, depth_overlap=0, progress=False)


def _fully_convolutional_predictor(norm_type: str, **predictor_kwargs):
    """A small random residual model (zero-initialised VAE, one-level U-Net) whose receptive field (~24 px, ~12 thin
    slices) fits the windows below; norm_type group gives the same model with per-sample statistics."""
    from ctld.config import DiffusionConfig
    from ctld.diffusion import ResidualSpec, build_train_scheduler
    from ctld.export import Export
    from ctld.models.unet import UNet3D
    from ctld.models.vae import AutoencoderKL3D
    from ctld.predictors import CtldPredictor

    torch.manual_seed(0)
    vae = AutoencoderKL3D(channels=(4, 4), latent_channels=4, norm_num_groups=4, norm_type=norm_type,
                          zero_init_residual=True).eval()
    unet = UNet3D(latent_channels=4, factor=5, channels=(8,), num_res_blocks=1, depth_downsample=(),
                  attention_levels=(False,), norm_num_groups=4, norm_type=norm_type).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    spec = ResidualSpec(prior="encode_cubic", factor=5, residual_scale=5.0, strength=0.5, num_train_timesteps=1000)
    export = Export(vae=vae, unet=unet, scheduler=build_train_scheduler(DiffusionConfig()),
                    meta={"factor": 5, **spec.to_meta()})
    return CtldPredictor(export, **predictor_kwargs)


def test_self_ensemble_output_mirrors_with_its_input():
    """self_ensemble averages each window over mirrored copies (ctld.predictors.FLIPS): 2 copies make the output
    exactly equivariant to a z mirror, 8 to every z/y/x mirror; one pass of a random model is neither."""
    rng = np.random.default_rng(0)
    thick = torch.from_numpy(rng.normal(0, 0.3, (1, 1, 4, 16, 16)).astype(np.float32))

    def mirror_error(predictor, dims):
        run = lambda x: predictor(x, predictor.prior_fn(x))  # noqa: E731  (the engine passes the prior likewise)
        with torch.no_grad():
            return float((run(thick.flip(dims)).flip(dims) - run(thick)).abs().max())

    single, z_pair, full = (_fully_convolutional_predictor("layer", self_ensemble=n) for n in (1, 2, 8))
    for dims in ((2,), (3,), (4,)):
        assert mirror_error(single, dims) > 1e-3, dims  # the check can fail
        assert mirror_error(full, dims) < 1e-5, dims
    assert mirror_error(z_pair, (2,)) < 1e-5 and mirror_error(z_pair, (4,)) > 1e-3
    with pytest.raises(ValueError, match="self_ensemble must be one of"):
        _fully_convolutional_predictor("layer", self_ensemble=3)


def test_a_shifted_window_grid_gives_the_same_thin_series_with_a_fully_convolutional_model():
    """The tiling check of ctld-eval --tiling_check: the window grid moved by half a window in every axis. With a
    per-voxel norm the two thin series agree to far below a HU inside the image; with GroupNorm (statistics per
    window) they differ by several HU everywhere (the tile-to-tile brightness steps readers saw)."""
    from scipy.ndimage import gaussian_filter

    from ctld.metrics import psnr

    rng = np.random.default_rng(0)
    thick = gaussian_filter(rng.normal(0, 400, (8, 96, 96)), 2) + 40
    thick[:, :, :40] -= 700  # two tissues, so per-window statistics differ between windows
    thick = thick.astype(np.int16)
    window = dict(factor=5, depth_thick=4, patch_size=16, hu_range=(-1024.0, 2048.0), depth_context=3,
                  depth_overlap=1, inplane_overlap=0.25, batch_size=2, progress=False, window_depth=14, tile_size=96)
    soft = {}
    for norm_type in ("layer", "group"):
        predictor = _fully_convolutional_predictor(norm_type)
        assert predictor.fully_convolutional == (norm_type == "layer") and predictor.tile_multiple == 2
        inner = (slice(None), slice(28, 68), slice(28, 68))  # image borders: zero padding vs air, not tiling
        one = interpolate_volume(thick, predictor, **window)[inner]
        shifted = interpolate_volume(thick, predictor, grid_shift=(7, 48, 48), **window)[inner]
        soft[norm_type] = psnr(shifted, one, (-160.0, 240.0))
    assert soft["layer"] > 60.0  # measured 70.1
    assert soft["group"] < soft["layer"] - 10.0  # measured 55.4


@pytest.mark.parametrize("period", [2, 3, 4])
def test_windows_start_in_phase_with_the_model_strides_and_leave_no_gap(period):
    """Every window starts a multiple of the stride period from the volume's first slice / pixel, whatever the grid
    shift, and every thin slice is still written (sizes, shifts, context and overlap swept)."""
    from ctld.inferer import _depth_span, fit_depth_windows

    for depth in (1, 2, 5, 13, 29):
        for depth_thick in (4, 7, 12):
            for context, overlap in ((0, 0), (1, 1), (2, 1), (3, 2)):
                for shift in ((0, 0, 0), (1, 3, 5), (7, 8, 2)):
                    c, o, p = fit_depth_windows(depth_thick, context, overlap, period)
                    plan = plan_windows((depth, 21, 34), factor=3, depth_thick=depth_thick, patch_size=8,
                                        depth_context=c, depth_overlap=o, inplane_overlap=0.25, grid_shift=shift,
                                        depth_period=p, inplane_period=period)
                    assert all((s - plan.pad_depth_start) % p == 0 for s in plan.depth_starts)
                    assert all((s - plan.pad_y) % period == 0 for s in plan.y_starts)
                    assert all((s - plan.pad_x) % period == 0 for s in plan.x_starts)
                    written = np.zeros(depth * 3, dtype=int)
                    for start in plan.depth_starts:
                        lo, hi, _, _ = _depth_span(start, plan, c * 3, (depth_thick - c) * 3)
                        written[lo:hi] += 1
                    assert written.min() >= 1, (depth, depth_thick, context, overlap, shift)


def test_resolve_window_grows_windows_only_for_fully_convolutional_models():
    from ctld.inferer import resolve_window

    def plain(x):
        return x

    def fully(x):
        return x

    fully.fully_convolutional, fully.tile_multiple = True, 4
    training = dict(depth_thick=4, patch_size=48, batch_size=8, depth_context=2, depth_overlap=1)
    assert resolve_window(plain, (28, 512, 512), **training) == (4, 48, 8)
    # 28 slices and their context are one window (nothing computed twice); batch scaled to the larger window.
    assert resolve_window(fully, (28, 512, 512), **training) == (32, 512, 1)
    assert resolve_window(fully, (3, 100, 90), **training) == (7, 100, 1)
    assert resolve_window(fully, (60, 512, 512), **training)[0] == 26  # 3 equal windows, not 32 + 32 + a sliver
    assert resolve_window(fully, (28, 700, 700), **training)[1] == 512
    assert resolve_window(fully, (28, 512, 512), **training, window_depth=8, tile_size=128) == (8, 128, 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        resolve_window(fully, (28, 512, 512), **training, tile_size=130)


def _export_trained_on_pixels(export: Path, tmp_path: Path, low_mm: float, high_mm: float) -> Path:
    """A copy of `export` whose ctld.json says it was trained on pixels of low_mm-high_mm."""
    import shutil

    copy = tmp_path / "export_pixels"
    shutil.copytree(export, copy)
    meta = json.loads((copy / "ctld.json").read_text())
    meta["domain"] = {**meta.get("domain", {}),
                      "pixel_spacing_mm": {"min": low_mm, "median": (low_mm + high_mm) / 2, "max": high_mm}}
    (copy / "ctld.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("trained_pixels_mm", [None, (0.7, 0.8)])
def test_hu_outside_the_model_window_is_kept_through_ctld_infer(tmp_path, infer_tiny_export, capsys, caplog,
                                                                 trained_pixels_mm):
    """-3024 HU padding outside the field of view and a 15000 HU hot spot: the model sees [-1024, 2048], yet the thin
    series keeps the padding exactly and the hot spot at the linear interpolation of the input, in DICOM and NIfTI;
    there, MAE in HU against the true thin series is linear interpolation's instead of thousands of HU. The same when
    the 1.5 mm pixels are run resampled to a model trained on 0.7-0.8 mm pixels."""
    import nibabel as nib

    from ctld.data.dicom_write import write_dicom_series

    export = infer_tiny_export
    if trained_pixels_mm:
        export = _export_trained_on_pixels(infer_tiny_export, tmp_path, *trained_pixels_mm)

    rng = np.random.default_rng(0)
    thin = (40 + 30 * rng.standard_normal((40, 40, 40))).astype(np.float32)
    yy, xx = np.mgrid[:40, :40]
    outside = (yy - 19.5) ** 2 + (xx - 19.5) ** 2 > 18**2
    thin[:, outside] = -3024.0
    thin[15:25, 18:22, 18:22] = 15000.0  # metal / dense contrast over two thick slabs, inside the body
    thin_volume = Volume(thin.astype(np.int16), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3))
    thick = _thick_of(thin_volume, 5)
    write_dicom_series(thick, tmp_path / "thick", patient={"PatientName": "HU^KEPT"}, series_description="thick")
    args = ["--checkpoint", str(export), "--format", "both"]
    assert main([str(tmp_path / "thick"), "--out", str(tmp_path / "out"), *args]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: no progress-bar updates
    assert ("runs it resampled to 0.8 mm pixels" in caplog.text) == bool(trained_pixels_mm)

    datasets = [pydicom.dcmread(f) for f in sorted((tmp_path / "out" / "dicom").glob("*.dcm"))]
    dicom_hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    nifti_hu = np.asarray(nib.load(tmp_path / "out" / "thin.nii.gz").dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(nifti_hu, dicom_hu)
    assert (dicom_hu[:, outside] == -3024).all()  # padding comes through unchanged
    linear = interpolate_z(thick.hu, 5, "linear")
    hot = linear > 2048
    assert hot.any() and dicom_hu.max() == 15000
    np.testing.assert_allclose(dicom_hu[hot], np.round(linear[hot]), atol=1)
    # Where the model knows nothing the error is interpolation's (a random model's errors elsewhere are not scored).
    beyond = (linear < -1024) | (linear > 2048)
    mae_beyond = np.abs(dicom_hu - thin)[beyond].mean()
    assert mae_beyond <= np.abs(np.round(linear) - thin)[beyond].mean() + 0.5
    assert np.abs(np.clip(dicom_hu, -1024, 2048) - thin)[beyond].mean() > 1000  # what clipping used to cost


def test_self_ensemble_reaches_ctld_infer_and_changes_its_output(tmp_path, infer_tiny_export, capsys):
    import nibabel as nib

    from ctld.data.nifti import write_nifti

    rng = np.random.default_rng(1)
    thin = Volume((40 + 200 * rng.standard_normal((40, 32, 32))).astype(np.int16), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0),
                  np.eye(3))
    write_nifti(_thick_of(thin, 5), tmp_path / "thick.nii.gz")
    outputs = {}
    for copies in (1, 2):
        out = tmp_path / f"out{copies}"
        assert main([str(tmp_path / "thick.nii.gz"), "--checkpoint", str(infer_tiny_export), "--out", str(out),
                     "--self_ensemble", str(copies)]) == 0
        assert f"self_ensemble={copies} (flag)" in capsys.readouterr().out
        outputs[copies] = np.asarray(nib.load(out / "thin.nii.gz").dataobj)
    assert np.abs(outputs[2].astype(float) - outputs[1]).max() >= 1  # a random model is not mirror-symmetric


# ---------------------------------------------------------------------------------------------- geometry


def test_baselines_follow_the_thin_grid():
    """Thin slice i of thick slice k sits at z_k + (i - (f-1)/2) dz/f: a linear ramp in z is reproduced exactly by
    linear and cubic interpolation away from the ends; rows of every matrix sum to 1."""
    factor, depth = 5, 12
    z_thick = 10.0 + 5.0 * np.arange(depth)
    z_thin = z_thick[0] - (factor - 1) / 2 * 1.0 + 1.0 * np.arange(depth * factor)
    thick = np.broadcast_to(z_thick[:, None, None], (depth, 2, 2)).astype(np.float32)
    interior = slice(2 * factor, (depth - 2) * factor)
    for method in ("linear", "cubic"):
        thin = interpolate_z(thick, factor, method)[:, 0, 0]
        np.testing.assert_allclose(thin[interior], z_thin[interior], atol=1e-4)
    for method in ("nearest", "linear", "cubic"):
        np.testing.assert_allclose(interpolation_matrix(depth, factor, method).sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(interpolate_z(thick, factor, "nearest")[:, 0, 0], np.repeat(z_thick, factor))


def test_thin_volume_geometry():
    direction = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])  # coronal slices: normal along LPS y
    thick = Volume(_thick((6, 8, 8)), (5.0, 0.8, 0.7), (10.0, 20.0, 30.0), direction)
    thin = thin_volume_like(thick, np.zeros((30, 8, 8), np.float32), 5)
    assert thin.spacing_mm == (1.0, 0.8, 0.7)
    np.testing.assert_array_equal(thin.direction, direction)
    # The mean position of the 5 thin slices of thick slice k is z_k.
    centres = thin.slice_positions_mm().reshape(6, 5, 3).mean(axis=1)
    np.testing.assert_allclose(centres, thick.slice_positions_mm(), atol=1e-9)
    assert thin.meta["slice_thickness_mm"] == 1.0


def test_non_finite_model_output_is_refused_not_written(tmp_path, monkeypatch, infer_tiny_export, capsys):
    """Issue 15: a NaN from the model stops ctld-infer with one line and exit 2; nothing is written."""
    import ctld.inference as inference
    from ctld.data.nifti import write_nifti

    with pytest.raises(ValueError, match="not finite"):
        thin_volume_like(Volume(_thick((2, 4, 4)), (5.0, 1.0, 1.0), (0, 0, 0), np.eye(3)),
                         np.full((10, 4, 4), np.nan), 5)
    real = inference.interpolate_at_spacing

    def diverged(*args, **kwargs):
        thin_hu = real(*args, **kwargs)
        thin_hu[3, 2, 1] = np.nan
        return thin_hu

    monkeypatch.setattr(inference, "interpolate_at_spacing", diverged)
    thick = Volume(_thick((4, 16, 16)), (7.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3))
    write_nifti(thick, tmp_path / "thick.nii.gz")
    code = main([str(tmp_path / "thick.nii.gz"), "--checkpoint", str(infer_tiny_export), "--out",
                 str(tmp_path / "out.nii.gz"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "1 of 5120 voxels are not finite" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.nii.gz").exists()


def test_inputs_the_model_cannot_handle_are_refused():
    tilted = np.eye(3)
    tilted[:, 2] = [0.0, np.sin(np.radians(15)), np.cos(np.radians(15))]
    volume = Volume(_thick((4, 8, 8)), (5.0, 1.0, 1.0), (0, 0, 0), tilted)
    with pytest.raises(ValueError, match=r"series-A.*15\.0 deg"):
        check_thick_input(volume, factor=5, name="series-A")
    thin = Volume(_thick((4, 8, 8)), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    check_thick_input(thin, factor=5, name="series-B")  # its spacing is the training domain's question (below)


# ---------------------------------------------------------------------------------------------- end to end


def _thick_of(thin: Volume, factor: int) -> Volume:
    """Simulated thick series with the geometry of docs/DESIGN.md: slab k is centred on its factor thin slices."""
    dz = thin.spacing_mm[0]
    origin = np.asarray(thin.origin_mm) + (factor - 1) / 2 * dz * thin.direction[:, 2]
    return Volume(simulate_thick(thin.hu, factor), (dz * factor, *thin.spacing_mm[1:]), tuple(origin),
                  thin.direction, meta={"slice_thickness_mm": dz * factor})


def test_ctld_infer_end_to_end_on_real_chest_ct(tmp_path, chest_ct_crop, infer_tiny_export, capsys):
    """Thick DICOM series (simulated from the real chest CT) -> ctld-infer -> thin DICOM series + NIfTI with the
    thin geometry, the input's patient/study, a new series; same seed -> same output."""
    import nibabel as nib

    from ctld.data.dicom_write import write_dicom_series

    thin = chest_ct_crop
    thick = _thick_of(thin, 5)
    patient = {"PatientName": "TEST^INFER", "PatientID": "INFER-0001"}
    study = {"StudyInstanceUID": pydicom.uid.generate_uid(), "FrameOfReferenceUID": pydicom.uid.generate_uid()}
    write_dicom_series(thick, tmp_path / "thick", patient=patient, study=study, series_description="thick 7.5")
    input_series = pydicom.dcmread(next((tmp_path / "thick").iterdir())).SeriesInstanceUID

    args = ["--checkpoint", str(infer_tiny_export), "--steps", "2", "--batch_size", "8", "--no_progress"]
    assert main([str(tmp_path / "thick"), "--out", str(tmp_path / "out"), "--format", "both", *args]) == 0

    files = sorted((tmp_path / "out" / "dicom").glob("*.dcm"))
    assert len(files) == thin.shape[0]
    datasets = [pydicom.dcmread(f) for f in files]
    expected_positions = thin.slice_positions_mm()
    for ds, position in zip(datasets, expected_positions, strict=True):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], position, atol=1e-4)
    first = datasets[0]
    assert first.PatientName == "TEST^INFER" and first.PatientID == "INFER-0001"
    assert first.StudyInstanceUID == study["StudyInstanceUID"]
    assert first.FrameOfReferenceUID == study["FrameOfReferenceUID"]
    assert first.SeriesInstanceUID != input_series
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1 and len({ds.SOPInstanceUID for ds in datasets}) == 40
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "ctld" in first.SeriesDescription
    assert float(first.SliceThickness) == pytest.approx(1.5) and float(first.SpacingBetweenSlices) == pytest.approx(1.5)
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([1.5, 1.5])
    assert first.PixelRepresentation == 1 and float(first.RescaleSlope) == 1 and first.pixel_array.shape == (45, 38)
    dicom_hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    assert -1024 <= dicom_hu.min() and dicom_hu.max() <= 2048

    image = nib.load(tmp_path / "out" / "thin.nii.gz")
    assert image.shape == (38, 45, 40)  # (x, y, z)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ thin.affine_lps()
    np.testing.assert_allclose(image.affine, ras, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), dicom_hu)

    # NIfTI in, NIfTI out. Regression (the default mode) is deterministic: the seed does not matter. Diffusion:
    # the same seed gives the same series, another seed another one.
    from ctld.data.nifti import write_nifti

    def run(name, *extra):
        assert main([str(tmp_path / "thick.nii.gz"), "--out", str(tmp_path / name), *args, *extra]) == 0
        return np.asarray(nib.load(tmp_path / name).dataobj)

    write_nifti(thick, tmp_path / "thick.nii.gz")
    np.testing.assert_array_equal(run("again.nii.gz", "--seed", "1"), np.asarray(image.dataobj))
    sampled = run("diffusion.nii.gz", "--mode", "diffusion")
    np.testing.assert_array_equal(run("diffusion_again.nii.gz", "--mode", "diffusion"), sampled)
    assert not np.array_equal(run("diffusion_seed1.nii.gz", "--mode", "diffusion", "--seed", "1"), sampled)
    assert not np.array_equal(sampled, np.asarray(image.dataobj))


def test_ctld_infer_refuses_a_thin_series(tmp_path, chest_ct_crop, infer_tiny_export, capsys):
    from ctld.data.nifti import write_nifti

    write_nifti(chest_ct_crop, tmp_path / "thin.nii.gz")
    code = main([str(tmp_path / "thin.nii.gz"), "--checkpoint", str(infer_tiny_export), "--out",
                 str(tmp_path / "out.nii.gz"), "--no_progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "thin.nii.gz" in err and "slice spacing 1.500 mm" in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_ctld_infer_refuses_a_real_tilted_series(tmp_path, shared_ct, infer_tiny_export, capsys):
    """The Philips gantry-tilt series of dcm_qa_ct: refused with the series, its first file and the tilt."""
    folder = shared_ct / "dcm_qa_ct_philips_tilt" / "In"
    code = main([str(folder), "--checkpoint", str(infer_tiny_export), "--out", str(tmp_path / "out"),
                 "--no_progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "gantry_tilt" in err and "deg off the slice normal" in err and "first file" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_ctld_predictor_bf16_on_gpu(infer_tiny_export):
    from ctld.export import load_export
    from ctld.predictors import CtldPredictor

    export = load_export(infer_tiny_export, "cuda")
    predictor = CtldPredictor(export, sampler="ddim", num_inference_steps=2, num_samples=2, seed=0, device="cuda")
    thin = interpolate_volume(_thick((6, 20, 20)), predictor, factor=5, depth_thick=4, patch_size=16,
                              hu_range=(-1024.0, 2048.0), depth_context=1, depth_overlap=0, device="cuda",
                              progress=False)
    assert thin.shape == (30, 20, 20) and np.isfinite(thin).all()


def test_slab_filter_recovers_a_known_filter_and_keeps_the_grid():
    """Thin data whose thin slices ARE a known per-phase filter of the thick ones: the closed-form fit finds it;
    rows sum to 1; its matrix and `apply` agree on numpy and torch; JSON round trip."""
    rng = np.random.default_rng(0)
    factor, taps = 5, 5
    truth = rng.normal(size=(factor, taps)) * 0.2
    truth[:, taps // 2] += 1.0 - truth.sum(axis=1)  # rows sum to 1
    thick = rng.normal(size=(30, 6, 6)) * 100.0
    thin = SlabFilter(truth).apply(thick)
    fitted = fit_slab_filter([(thick, thin)], factor, taps=taps)
    np.testing.assert_allclose(fitted.weights, truth, atol=1e-5)
    np.testing.assert_allclose(fitted.weights.sum(axis=1), 1.0, atol=1e-9)
    matrix = fitted.matrix(7)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-9)
    window = torch.from_numpy(thick[None, None, :7].astype(np.float32))
    np.testing.assert_allclose(fitted.apply(window)[0, 0].numpy(), fitted.apply(thick[:7]), rtol=1e-4, atol=1e-2)
    again = SlabFilter.from_json(json.loads(json.dumps(fitted.to_json())))
    np.testing.assert_allclose(again.weights, fitted.weights, atol=1e-8)


def test_slab_filter_beats_cubic_on_slab_averages():
    """On smooth data whose thick slices are slab means, the fitted filter undoes part of the slab blur: it scores
    above cubic interpolation on held-out data (the reason every report carries it)."""
    from scipy import ndimage

    rng = np.random.default_rng(1)

    def pair(seed):
        thin = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(80, 16, 16)), (2.0, 1, 1)) * 500
        return simulate_thick(thin, 5), thin

    fitted = fit_slab_filter([pair(s) for s in range(3)], 5)
    thick, thin = pair(int(rng.integers(100, 1000)))
    window = (float(thin.min()), float(thin.max()))
    from ctld.metrics import psnr

    assert psnr(fitted.apply(thick), thin, window) > psnr(interpolate_z(thick, 5, "cubic"), thin, window) + 0.5


def test_a_model_run_at_other_pixels_keeps_the_series_own_in_plane_detail(caplog):
    """A series run at the model's pixel spacing (trained resampled, or outside the trained range) is resampled to
    it, and only the model's correction of cubic interpolation comes back: a model that adds 10 HU to cubic gives
    cubic + 10 HU on the series' own pixels, fine in-plane detail included (a round trip of the whole output through
    pixels twice as coarse would blur it by tens of HU)."""
    from ctld.inferer import interpolate_at_spacing

    rng = np.random.default_rng(0)
    detail = rng.normal(0, 100, size=(6, 40, 40)).astype(np.float32)  # different at every pixel
    y, x = np.meshgrid(np.arange(40.0), np.arange(40.0), indexing="ij")
    ramp = (rng.normal(0, 100, size=(6, 1, 1)) + 3.0 * y - 2.0 * x).astype(np.float32)  # survives linear resampling

    def cubic_plus(offset_hu, gain):
        def predict(window):
            cubic = interpolate_z(window, 5, "cubic")
            return cubic * gain + offset_hu

        predict.fully_convolutional = True
        return predict

    window = dict(factor=5, depth_thick=5, patch_size=16, hu_range=None, depth_context=2, depth_overlap=0,
                  progress=False)
    with caplog.at_level("INFO"):
        out = interpolate_at_spacing(detail, cubic_plus(10.0, 1.0), pixel_spacing_mm=(0.5, 0.5),
                                     model_pixel_spacing_mm=1.0, **window)
    assert "(40, 40) -> (20, 20)" in caplog.text  # the model saw 1 mm pixels
    assert out.shape == (30, 40, 40)
    np.testing.assert_allclose(out, interpolate_z(detail, 5, "cubic") + 10.0, atol=1e-3)
    # A correction that varies over the image comes back onto the series' pixels: 10% of cubic on a linear field.
    # Within 0.1 HU: the resampled input is stored in whole HU (int16), as the shards do.
    out = interpolate_at_spacing(ramp, cubic_plus(0.0, 1.1), pixel_spacing_mm=(0.5, 0.5),
                                 model_pixel_spacing_mm=1.0, **window)
    np.testing.assert_allclose(out, 1.1 * interpolate_z(ramp, 5, "cubic"), atol=0.1, rtol=1e-5)
    same = interpolate_at_spacing(detail, cubic_plus(10.0, 1.0), pixel_spacing_mm=(0.5, 0.5),
                                  model_pixel_spacing_mm=0.5, **window)
    np.testing.assert_allclose(same, interpolate_z(detail, 5, "cubic") + 10.0, atol=1e-3)


def test_the_tiling_check_shifts_by_half_a_window_of_the_grid_the_model_runs_at():
    """ctld-eval --tiling_check on a series run at other pixels: the half-window shift is planned on the resampled
    grid (20 px at 1 mm for 40 px of 0.5 mm), not on the series' own, where it would be a whole window."""
    from ctld.evaluate import check_tiling
    from ctld.inferer import interpolate_at_spacing

    def cubic(window):
        return interpolate_z(window, 5, "cubic")

    cubic.fully_convolutional = True  # whole slices per window
    thick = np.random.default_rng(0).normal(0, 100, size=(12, 40, 40)).astype(np.float32)
    run = dict(pixel_spacing_mm=(0.5, 0.5), model_pixel_spacing_mm=1.0, factor=5, depth_thick=4, patch_size=16,
               hu_range=None, depth_context=2, depth_overlap=0, inplane_overlap=0.25, batch_size=2, window_depth=0,
               tile_size=0, progress=False)
    result = check_tiling(thick, cubic, interpolate_at_spacing(thick, cubic, **run), run)
    assert result["window"][1:] == [20, 20] and result["grid_shift"][1:] == [10, 10]
    assert result["max_abs_difference_hu"] < 1e-3  # interpolation does not depend on the tiling


def test_the_model_pixel_spacing_is_the_trained_one_or_the_nearest_end_of_the_trained_range():
    from ctld.data.domain import model_pixel_spacing_mm

    assert model_pixel_spacing_mm(DOMAIN_META, (0.7, 0.7)) is None  # inside 0.6-0.8 mm: its own pixels
    assert model_pixel_spacing_mm(DOMAIN_META, (0.85, 0.85)) is None  # within 10%: not worth a resampling
    assert model_pixel_spacing_mm(DOMAIN_META, (1.5, 1.5)) == pytest.approx(0.8)  # a coarse CTA, upsampled
    assert model_pixel_spacing_mm(DOMAIN_META, (0.28, 0.28)) == pytest.approx(0.6)  # a spine reconstruction
    assert model_pixel_spacing_mm({**DOMAIN_META, "inplane_spacing_mm": 1.0}, (0.5, 0.5)) == 1.0  # trained resampled
    assert model_pixel_spacing_mm({**DOMAIN_META, "inplane_spacing_mm": 1.0}, (1.0, 1.0)) is None
    assert model_pixel_spacing_mm({"factor": 5}, (3.0, 3.0)) is None  # no trained range known: as it comes


def test_manifest_training_grid_reports_in_plane_resampling(tmp_path):
    from ctld.data.shards import manifest_training_grid

    manifest = {"shards": [], "geometry": {"thin_spacing_z_mm": {"median": 1.25}},
                "settings": {"inplane_spacing_mm": 0.8}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_training_grid(tmp_path) == {"thin_spacing_mm": 1.25, "inplane_spacing_mm": 0.8}
    manifest["settings"]["inplane_spacing_mm"] = 0.0  # kept as scanned: nothing to resample at inference
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_training_grid(tmp_path) == {"thin_spacing_mm": 1.25}
    assert manifest_training_grid(tmp_path / "missing") == {}


# ------------------------------------------------------------------------------ training domain and settings (17)

DOMAIN_META = {"factor": 5, "thin_spacing_mm": 1.0, "hu_min": -1024.0, "hu_max": 2048.0,
               "domain": {"thin_spacing_mm": {"min": 0.9, "median": 1.0, "max": 1.0},
                          "pixel_spacing_mm": {"min": 0.6, "median": 0.7, "max": 0.8},
                          "hu_p1": {"min": -1024.0, "median": -1010.0, "max": -990.0},
                          "hu_p99": {"min": 600.0, "median": 700.0, "max": 900.0}}}


def _chest_like(low: float = -1000.0, high: float = 750.0) -> np.ndarray:
    hu = np.full((6, 20, 20), 40.0)
    hu[:, :3] = low  # air above the body
    hu[:, -2:] = high  # bone below it
    return hu


@pytest.mark.parametrize(("spacing", "hu", "expected"), [
    ((5.0, 0.7, 0.7), _chest_like(), []),
    ((5.4, 0.7, 0.7), _chest_like(), [("slice_spacing", False, "5.400 mm is outside the trained 4.5-5 mm")]),
    ((3.0, 0.7, 0.7), _chest_like(), [("slice_spacing", True, "3.000 mm is 3.00 thin slices")]),
    ((5.0, 0.85, 0.85), _chest_like(), []),  # within 10% of the trained range: run as it is, silently
    ((5.0, 1.0, 0.7), _chest_like(), [("pixel_spacing", False, "row pixel spacing 1.000 mm")]),
    ((5.0, 0.7, 2.0), _chest_like(), [("pixel_spacing", False, "runs it resampled to 0.8 mm pixels")]),
    ((5.0, 0.7, 2.6), _chest_like(), [("pixel_spacing", True, "column pixel spacing 2.600 mm")]),
    ((5.0, 0.7, 0.7), _chest_like(high=1100.0), [("hu", False, "99th HU percentile 1100")]),
    ((5.0, 0.7, 0.7), _chest_like() + 1024, [("hu", True, "1st HU percentile 24"), ("hu", True, "99th")]),
    ((5.0, 0.7, 0.7), _chest_like(low=-3024.0), []),  # padding below the window is clipped: not a difference
])
def test_input_differences_name_what_differs(spacing, hu, expected):
    from ctld.data.domain import input_differences

    found = input_differences(hu, spacing, DOMAIN_META, spacing_tolerance=0.25)
    assert [(d.what, d.refuse) for d in found] == [(what, refuse) for what, refuse, _ in expected]
    for difference, (_, _, text) in zip(found, expected, strict=True):
        assert text in difference.text


def test_mixed_thin_spacings_accept_every_trained_spacing_and_refuse_another_factor():
    """The slice spacing policy: a model trained on thin series of 1.0-1.25 mm takes thick series of 5-6.25 mm
    silently, 8 mm (a 1.6 mm archive's) with a warning at the default 50% tolerance, and refuses 3 mm (another
    factor: 0.6 mm thin slices) and an already thin series."""
    from ctld.config import InferConfig
    from ctld.data.domain import input_differences

    meta = {**DOMAIN_META, "thin_spacing_mm": 1.25,
            "domain": {"thin_spacing_mm": {"min": 1.0, "median": 1.25, "max": 1.25}}}
    tolerance = InferConfig().spacing_tolerance
    for dz, expected in ((5.0, []), (6.25, []), (5.6, []), (8.0, [False]), (3.0, [True]), (1.25, [True])):
        found = input_differences(_chest_like(), (dz, 0.7, 0.7), meta, spacing_tolerance=tolerance)
        assert [d.refuse for d in found] == expected, (dz, [d.text for d in found])
    assert "trained on thick slices of 5-6.25 mm" in input_differences(
        _chest_like(), (3.0, 0.7, 0.7), meta, spacing_tolerance=tolerance)[0].text


def test_an_unknown_domain_checks_only_the_slice_spacing():
    from ctld.data.domain import input_differences

    meta = {k: v for k, v in DOMAIN_META.items() if k != "domain"}  # e.g. trained on explicit shard URLs
    assert input_differences(_chest_like() + 1024, (5.0, 3.0, 3.0), meta, spacing_tolerance=0.25) == []
    assert [d.refuse for d in input_differences(_chest_like(), (2.0, 1, 1), meta, spacing_tolerance=0.25)] == [True]
    warned = input_differences(_chest_like(), (2.0, 1, 1), meta, spacing_tolerance=-1)
    assert [d.refuse for d in warned] == [False]


def test_refusals_go_on_with_the_flag_as_warnings(caplog):
    from ctld.data.domain import Difference, OutOfDistributionError, check_input

    found = [Difference("hu", "HU is off", True), Difference("pixel_spacing", "pixels are off", False)]
    with pytest.raises(OutOfDistributionError, match=r"^series-C: .*HU is off\. Pass --allow_out_of_distribution"):
        check_input(found, name="series-C", allow=False)
    with caplog.at_level("WARNING"):
        check_input(found, name="series-C", allow=True)
    assert "HU is off (a refusal, overridden" in caplog.text and "pixels are off" in caplog.text


def test_settings_precedence_flag_config_export_default(tmp_path):
    import argparse

    from ctld.infer_settings import describe, resolve_settings
    from ctld.inference import add_infer_flags

    parser = argparse.ArgumentParser()
    add_infer_flags(parser)
    recorded = {"mode": "diffusion", "num_inference_steps": 4, "seed": 3, "batch_size": 8}
    config = tmp_path / "infer.yaml"
    config.write_text("infer:\n  seed: 5\n  batch_size: 2\n")
    cfg, sources = resolve_settings(parser.parse_args(["--config", str(config), "--batch_size", "1"]), recorded)
    assert (cfg.mode, cfg.num_inference_steps, cfg.seed, cfg.batch_size, cfg.sampler) == ("diffusion", 4, 5, 1, "ddim")
    assert (sources["mode"], sources["seed"], sources["batch_size"], sources["sampler"]) == (
        "export", "config", "flag", "default")
    line = describe(cfg, sources)
    assert line.startswith("settings: mode=diffusion (export), ") and "batch_size=1 (flag)" in line
    assert "adapt_lr" not in line  # adaptation details only when adapting
    cfg, sources = resolve_settings(parser.parse_args([]), None)
    assert set(sources.values()) == {"default"}
    with pytest.raises(ValueError, match="recorded in the export's ctld.json.*num_inference_steps"):
        resolve_settings(parser.parse_args([]), {"num_inference_steps": "many"})
