from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from ctld.metrics import PSNR_CAP_DB, WINDOWS, all_metrics, mae_hu, psnr, ssim2d_mean


def _volume(seed: int = 0, shape=(4, 24, 24)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=shape).astype(np.int16)


def test_windows_are_the_documented_ones():
    assert WINDOWS["wide"] == (-1024.0, 2048.0)
    lo, hi = WINDOWS["soft_tissue"]
    assert (lo + hi) / 2 == 40 and hi - lo == 400  # center 40, width 400


def test_psnr_known_value_and_cap():
    target = np.zeros((2, 8, 8))
    pred = np.full((2, 8, 8), 10.0)  # 0.1 in the window (0, 100) -> MSE 0.01 -> 20 dB
    assert psnr(pred, target, window=(0.0, 100.0)) == pytest.approx(20.0)
    assert psnr(target, target, window=(0.0, 100.0)) == PSNR_CAP_DB


def test_psnr_clips_to_the_window():
    target = np.full((1, 8, 8), 300.0)
    pred = np.full((1, 8, 8), 1000.0)  # both above the soft-tissue window: identical after windowing
    assert psnr(pred, target, WINDOWS["soft_tissue"]) == PSNR_CAP_DB
    assert psnr(pred, target, WINDOWS["wide"]) < 30


def test_ssim_is_skimage_per_axial_slice_mean():
    target, pred = _volume(0), _volume(1)
    lo, hi = WINDOWS["wide"]
    expected = np.mean([
        structural_similarity(np.clip((p - lo) / (hi - lo), 0, 1), np.clip((t - lo) / (hi - lo), 0, 1), data_range=1.0)
        for p, t in zip(pred.astype(np.float64), target.astype(np.float64), strict=True)
    ])
    assert ssim2d_mean(pred, target, WINDOWS["wide"]) == pytest.approx(expected, rel=1e-9)
    assert ssim2d_mean(target, target, WINDOWS["wide"]) == pytest.approx(1.0)


def test_mae_and_all_metrics_accept_torch_batches():
    target = torch.from_numpy(_volume(0)).float()[None, None]  # (B, 1, D, H, W) as in training validation
    pred = target + 7.0
    assert mae_hu(pred, target) == pytest.approx(7.0)
    metrics = all_metrics(pred, target)
    assert set(metrics) == {"psnr_wide", "ssim_wide", "psnr_soft_tissue", "ssim_soft_tissue", "mae_hu"}
    assert metrics["psnr_wide"] > metrics["psnr_soft_tissue"]  # a 7 HU error is larger in a narrow window


def test_shape_mismatch_and_tiny_slices_are_refused():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)), WINDOWS["wide"])
    with pytest.raises(ValueError, match="7x7"):
        ssim2d_mean(np.zeros((2, 5, 5)), np.zeros((2, 5, 5)), WINDOWS["wide"])


def test_rplhr_protocol():
    """RPLHR-CT: [-1024, 2048] HU -> [0, 1], end slices trimmed, PSNR with MAX 1, SSIM per axial slice with the
    11x11 Gaussian window (sigma 1.5) of Wang et al."""
    from ctld.metrics import RPLHR_TRIM_SLICES, rplhr_metrics

    target = _volume(shape=(20, 24, 24)).astype(np.float64)
    pred = target + np.random.default_rng(5).normal(scale=30.0, size=target.shape)
    pred[:RPLHR_TRIM_SLICES] += 3000.0  # trimmed: must not count
    out = rplhr_metrics(pred, target)
    keep = slice(RPLHR_TRIM_SLICES, -RPLHR_TRIM_SLICES)
    unit_p = np.clip((pred[keep] + 1024) / 3072, 0, 1)
    unit_t = np.clip((target[keep] + 1024) / 3072, 0, 1)
    assert out["rplhr_psnr"] == pytest.approx(10 * np.log10(1 / np.mean((unit_p - unit_t) ** 2)))
    expected = np.mean([structural_similarity(p, t, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False) for p, t in zip(unit_p, unit_t)])
    assert out["rplhr_ssim"] == pytest.approx(expected)
    assert rplhr_metrics(target, target)["rplhr_psnr"] == PSNR_CAP_DB
    assert set(all_metrics(pred, target, rplhr=True)) >= {"rplhr_psnr", "rplhr_ssim", "psnr_wide"}
