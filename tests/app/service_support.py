"""Shared pieces of the service tests: a real encoder bundle, settings, clients, images.

The bundle is real: a ConVIRT model with the shipped pretrained towers (EfficientNet-Lite0,
MiniLM-L6) and untrained projection heads, saved as a training checkpoint and exported by
``model.bundle.export_bundle`` exactly as ``convirt export`` does. It is built once per
test session; its embeddings are not meaningful for retrieval quality, but they are
deterministic, normalised and different per input, which is all the API tests rely on.

The session fixtures built on it (``bundle_dir``, ``bundle``, ``kermany_images``) live in
``tests/conftest.py``; test modules import the plain helpers below.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import func, select

from app.main import create_app
from app.models import Embedding, Image
from app.services.runtime import Runtime
from app.settings import Settings
from model.bundle import EncoderBundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_bundle(out_dir: Path) -> Path:
    """Export a real bundle of a freshly built model (pretrained towers, untrained heads)."""
    import torch

    from model.bundle import export_bundle
    from model.checkpoint import save_checkpoint
    from model.convirt import build_model
    from model.training.config import TrainConfig, train_config_to_dict

    torch.manual_seed(0)
    config = TrainConfig(name="service-test")
    model = build_model(config.model)
    checkpoint = out_dir / "checkpoint" / "last.pt"
    save_checkpoint(
        checkpoint,
        {
            "config": train_config_to_dict(config),
            "model": model.state_dict(),
            "progress": {"epoch": 0, "step": 0},
            "val_loss": None,
        },
    )
    return export_bundle(checkpoint, out_dir / "bundle", name="service-test")


def make_settings(data_dir: Path, database_url: str, bundle_dir: Path, **extra: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        bundle_dir=bundle_dir,
        **extra,
    )


@contextmanager
def running_app(settings: Settings, bundle: EncoderBundle | None) -> Iterator[TestClient]:
    """A TestClient on a real app, lifespan included (start-up reconcile, shutdown save)."""
    app = create_app(settings, bundle=bundle)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def runtime_of(client: TestClient) -> Runtime:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert isinstance(runtime, Runtime)
    return runtime


def db_state(runtime: Runtime) -> tuple[int, list[int], list[int]]:
    """(image count, sorted image ids, sorted ids with a current-model embedding)."""
    with runtime.sessions() as session:
        count = int(session.scalar(select(func.count()).select_from(Image)) or 0)
        ids = sorted(int(i) for i in session.scalars(select(Image.id)))
        embedded = sorted(
            int(i)
            for i in session.scalars(
                select(Embedding.image_id).where(Embedding.model_id == runtime.bundle.model_id)
            )
        )
    return count, ids, embedded


def assert_consistent(runtime: Runtime) -> None:
    """Database and index agree: every image has a vector and the index holds exactly those."""
    _, ids, embedded = db_state(runtime)
    assert embedded == ids
    assert runtime.index.ids().tolist() == ids


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    """A distinct small 8-bit greyscale PNG per seed (for tests that need many images)."""
    rng = np.random.default_rng(seed)
    return png_bytes(rng.integers(0, 256, size=size, dtype=np.uint8))


def is_problem(response: Any, status: int, code: str) -> None:
    """The response is an RFC 9457 problem with this status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["title"]


Uploader = Callable[..., Any]


def upload(
    client: TestClient,
    files: list[bytes],
    *,
    names: list[str] | None = None,
    content_type: str = "application/octet-stream",
    **fields: Any,
) -> Any:
    """POST /images with ``files`` (multipart) and optional form fields (str or list)."""
    names = names or [f"f{i}" for i in range(len(files))]
    parts = [("files", (name, data, content_type)) for name, data in zip(names, files, strict=True)]
    data: dict[str, Any] = {}
    for key, value in fields.items():
        data[key] = value
    return client.post("/images", files=parts, data=data)
