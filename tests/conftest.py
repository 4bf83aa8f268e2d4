"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared beside the project root: real data and the official protocol files (tests only).
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"{SHARED_DIR} is missing: the tests read real data from ../shared")
    return SHARED_DIR
