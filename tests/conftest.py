"""Fixtures shared by the whole suite: the shared data, a real encoder bundle, real images.

Heavy imports (torch, the app) happen inside the fixtures, so collecting a test that uses
none of them stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from model.bundle import EncoderBundle

#: ../shared beside the project root: real data and the official protocol files (tests only).
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"

KERMANY = "data/kermany-16"

#: Label sets of the two Kermany classes, as CheXpert-style labels.
KERMANY_LABELS: dict[str, dict[str, float | None]] = {
    "normal": {"No Finding": 1.0, "Pneumonia": 0.0},
    "bacterial pneumonia": {"No Finding": 0.0, "Pneumonia": 1.0},
}


#: Host names the apps under test answer to: the loopback defaults, and ``testserver``, the
#: Host that Starlette's TestClient sends. Tests of the Host check pass their own list.
TEST_ALLOWED_HOSTS = "localhost,127.0.0.1,[::1],testserver"


def pytest_configure(config: pytest.Config) -> None:
    # Set for the whole run (subprocesses inherit it); a developer's own value is kept.
    os.environ.setdefault("CONVIRT_ALLOWED_HOSTS", TEST_ALLOWED_HOSTS)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"{SHARED_DIR} is missing: the tests read real data from ../shared")
    return SHARED_DIR


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.app.service_support import build_bundle

    return build_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def bundle(bundle_dir: Path) -> EncoderBundle:
    from model.bundle import EncoderBundle

    return EncoderBundle.load(bundle_dir, device="cpu")


@pytest.fixture(scope="session")
def kermany_images(shared_dir: Path) -> list[tuple[bytes, dict[str, float | None]]]:
    """The 16 real Kermany radiographs (PNG bytes) with their labels."""
    root = shared_dir / KERMANY
    rows = (root / "labels.csv").read_text(encoding="utf-8").splitlines()[1:]
    out = []
    for row in rows:
        name, label, _ = row.split(",")
        out.append(((root / "images" / name).read_bytes(), KERMANY_LABELS[label]))
    return out
