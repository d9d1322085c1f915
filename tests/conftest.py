"""Shared fixtures: tiny phantom data sets, made once per test session."""

from pathlib import Path

import pytest
from helpers import make_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(MSD folder, partitioned sites folder) with 8 patients of 32^3."""
    return make_dataset(tmp_path_factory.mktemp("tiny"), patients=8)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return Path(__file__).resolve().parents[1]
