"""Shared fixtures. Fixtures that build data (DICOM series, shards) live here so every test module reuses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctld.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "ct"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """../shared/data/ct: real public CT files. Absent in a user's clone, so tests that need it skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real CT test data not found at {SHARED_DATA} (it sits beside the repo in CI only)")
    return SHARED_DATA


@pytest.fixture
def tiny_cfg() -> Config:
    return load_config(REPO_ROOT / "configs" / "tiny.yaml")
