"""Shared pytest fixtures (keep this file small)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The study data folder ($PREFNB_DATA, else ../shared/data), as every run finds it."""
    from prefnb.data import resolve_data_dir

    return resolve_data_dir(None)
