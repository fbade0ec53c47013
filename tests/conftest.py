"""Shared pytest fixtures; dataset builders live in ``tests/fixtures_data.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures_data import default_data_root, find_camvid_root


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """The data root holding the real CamVid (``$RALIS_GYM_DATA``, else ``../shared/data`` relative
    to the repository root), or skip."""
    root = find_camvid_root()
    if root is None:
        pytest.skip(
            f"real CamVid not found: {default_data_root() / 'camvid'} lacks train/val/test(+annot) folders; "
            "set RALIS_GYM_DATA to the folder holding camvid/"
        )
    return root.resolve()  # absolute: tests also run scripts from other working directories
