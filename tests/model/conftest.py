"""Fixtures shared by the model tests: the trainer's synthetic corpus and tiny towers.

Every transformers load in these tests reads local files. ``HF_HUB_OFFLINE`` is set here,
before any test module imports transformers, because the hub client reads it at import.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer tests' corpus: 64 synthetic studies (seed 0, 96 px); its manifest path.

    With the default splits it yields 54 training pairs: 6 optimizer steps of 8 per epoch.
    """
    from model.data.synthetic import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("corpus"), 64, seed=0, size=96, progress=False)


@pytest.fixture(scope="session")
def towers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(image backbone dir, text encoder dir) of tiny randomly initialised towers."""
    from tests.model.trainer_support import make_tiny_towers

    return make_tiny_towers(tmp_path_factory.mktemp("towers"))
