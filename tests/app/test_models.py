"""The ORM models and the database helpers on migrated SQLite and PostgreSQL databases."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from app.db import create_engine_for, ping, session_factory, upgrade_database
from app.models import (
    CachedEmbedding,
    Embedding,
    EncoderModel,
    EvaluationRun,
    Image,
    InvalidVectorError,
    NaiveDatetimeError,
    bytes_to_vector,
    vector_to_bytes,
)
from app.settings import Settings

MODEL_ID = "sha256:" + "ab" * 32


@pytest.fixture
def factory(database_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    upgrade_database(database_url)
    engine = create_engine_for(Settings(data_dir=tmp_path / "data", database_url=database_url))
    yield session_factory(engine)
    engine.dispose()


def _image(seed: str, **fields: object) -> Image:
    digest = hashlib.sha256(seed.encode()).hexdigest()
    values: dict[str, object] = {
        "content_hash": digest,
        "source_format": "png",
        "width": 512,
        "height": 480,
        "image_path": f"images/{digest[:2]}/{digest}.png",
        "thumbnail_path": f"thumbs/{digest[:2]}/{digest}.png",
    }
    values.update(fields)
    return Image(**values)


def _unit(dim: int, seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)  # (dim,)
    return vector / np.linalg.norm(vector)


def test_image_round_trip_keeps_labels_report_and_aware_timestamps(
    factory: sessionmaker[Session],
) -> None:
    labels = {"Pleural Effusion": 1.0, "Edema": -1.0, "Cardiomegaly": 0.0}
    before = dt.datetime.now(dt.UTC)
    with factory.begin() as session:
        image = _image(
            "a",
            bits=15,
            photometric="MONOCHROME1",
            view_position="PA",
            modality="CR",
            labels=labels,
            report_text="Blunting of the costophrenic angles.",
            study_ref="ext-7f3a",
        )
        session.add(image)
        session.flush()
        image_id = image.id
    assert image_id >= 1

    with factory.begin() as session:
        stored = session.get(Image, image_id)
        assert stored is not None
        assert stored.labels == labels
        assert stored.report_text == "Blunting of the costophrenic angles."
        assert (stored.bits, stored.photometric, stored.view_position) == (15, "MONOCHROME1", "PA")
        assert stored.original_path is None
        assert stored.created_at.tzinfo is not None
        assert stored.created_at.utcoffset() == dt.timedelta(0)
        assert before - dt.timedelta(seconds=5) <= stored.created_at <= dt.datetime.now(dt.UTC)
        first_update = stored.updated_at
        stored.report_text = "No acute findings."
    with factory.begin() as session:
        stored = session.get(Image, image_id)
        assert stored is not None
        assert stored.updated_at > first_update


def test_ids_autoincrement(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        images = [_image(f"img{i}") for i in range(3)]
        session.add_all(images)
        session.flush()
        ids = [image.id for image in images]
    assert len(set(ids)) == 3
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_same_content_hash_is_refused(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        session.add(_image("dup"))
    with pytest.raises(IntegrityError), factory.begin() as session:
        session.add(_image("dup", source_format="dicom"))
    with factory.begin() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Image)) == 1


def test_embedding_vector_round_trip_and_cascade_on_image_delete(
    factory: sessionmaker[Session],
) -> None:
    vector = _unit(512, 0)
    with factory.begin() as session:
        session.add(EncoderModel(id=MODEL_ID, name="convirt-small", dim=512, is_active=True))
        image = _image("emb")
        session.add(image)
        session.flush()
        session.add(Embedding.from_vector(image.id, MODEL_ID, vector))
        image_id = image.id

    with factory.begin() as session:
        row = session.get(Embedding, (image_id, MODEL_ID))
        assert row is not None
        assert row.dim == 512
        np.testing.assert_array_equal(row.as_array(), vector)

    # A bulk delete, as the service's DELETE does: the database cascades, not the ORM.
    with factory.begin() as session:
        session.execute(sa.delete(Image).where(Image.id == image_id))
    with factory.begin() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Embedding)) == 0
        model = session.get(EncoderModel, MODEL_ID)
        assert model is not None
        assert model.is_active


def test_embedding_needs_a_known_image_and_model(factory: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError), factory.begin() as session:
        session.add(Embedding.from_vector(12345, MODEL_ID, _unit(8, 1)))


def test_database_checks_vector_length_against_dim(factory: sessionmaker[Session]) -> None:
    data, _ = vector_to_bytes(_unit(8, 2))
    with factory.begin() as session:
        session.add(EncoderModel(id=MODEL_ID, name="m", dim=8))
        image = _image("len")
        session.add(image)
        session.flush()
        image_id = image.id
    with pytest.raises(IntegrityError), factory.begin() as session:
        session.add(Embedding(image_id=image_id, model_id=MODEL_ID, dim=9, vector=data))


def test_embedding_cache_is_keyed_by_model_and_content_hash(
    factory: sessionmaker[Session],
) -> None:
    content_hash = hashlib.sha256(b"candidate").hexdigest()
    first, second = _unit(16, 3), _unit(16, 4)
    with factory.begin() as session:
        session.add(CachedEmbedding.from_vector(MODEL_ID, content_hash, first))
        session.add(CachedEmbedding.from_vector("sha256:" + "cd" * 32, content_hash, second))
    with factory.begin() as session:
        row = session.get(CachedEmbedding, (MODEL_ID, content_hash))
        assert row is not None
        np.testing.assert_array_equal(row.as_array(), first)
    with pytest.raises(IntegrityError), factory.begin() as session:
        session.add(CachedEmbedding.from_vector(MODEL_ID, content_hash, second))


def _count_runs(session: Session, *where: sa.ColumnElement[bool]) -> int | None:
    return session.scalar(sa.select(sa.func.count()).select_from(EvaluationRun).where(*where))


def test_evaluation_run_lifecycle_and_status_check(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        queued = EvaluationRun(model_id=MODEL_ID, protocol="chexpert-8x200", params={"k": [5]})
        session.add(queued)
        session.flush()
        run_id = queued.id
        assert (queued.status, queued.progress, queued.results) == ("queued", 0.0, None)
    with factory.begin() as session:
        # None is SQL NULL, not JSON 'null': "results IS NULL" finds the unfinished runs.
        assert _count_runs(session, EvaluationRun.results.is_(None)) == 1
        running = session.get(EvaluationRun, run_id)
        assert running is not None
        running.status = "succeeded"
        running.progress = 1.0
        running.started_at = dt.datetime.now(dt.UTC)
        running.finished_at = dt.datetime.now(dt.timezone(dt.timedelta(hours=2)))
        running.results = {"image_to_image": {"p@10": 0.43}}
    with factory.begin() as session:
        done = session.get(EvaluationRun, run_id)
        assert done is not None
        assert done.results == {"image_to_image": {"p@10": 0.43}}
        assert done.params == {"k": [5]}
        assert done.finished_at is not None
        assert done.started_at is not None
        assert done.finished_at.utcoffset() == dt.timedelta(0)
        assert done.finished_at >= done.started_at - dt.timedelta(seconds=1)
        assert _count_runs(session, EvaluationRun.results.is_(None)) == 0
    unknown_status = EvaluationRun(model_id=MODEL_ID, protocol="p", params={}, status="paused")
    with pytest.raises(IntegrityError), factory.begin() as session:
        session.add(unknown_status)


def _add_and_flush(factory: sessionmaker[Session], row: object) -> None:
    with factory.begin() as session:
        session.add(row)
        session.flush()


def test_naive_datetimes_are_refused(factory: sessionmaker[Session]) -> None:
    naive = dt.datetime(2024, 1, 1, 12, 0)
    run = EvaluationRun(model_id=MODEL_ID, protocol="p", params={}, started_at=naive)
    with pytest.raises(StatementError) as caught:
        _add_and_flush(factory, run)
    assert isinstance(caught.value.orig, NaiveDatetimeError)


def test_vector_packing_is_float32_little_endian() -> None:
    data, dim = vector_to_bytes([1.0, -2.5, 0.25])
    assert dim == 3
    assert data == np.array([1.0, -2.5, 0.25], dtype="<f4").tobytes()
    np.testing.assert_array_equal(bytes_to_vector(data, 3), [1.0, -2.5, 0.25])
    with pytest.raises(InvalidVectorError):
        vector_to_bytes(np.zeros((2, 3)))
    with pytest.raises(InvalidVectorError):
        vector_to_bytes([1.0, float("nan")])
    with pytest.raises(InvalidVectorError):
        bytes_to_vector(data, 4)


def test_sqlite_engine_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "nested" / "data")
    engine = create_engine_for(settings)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1
        assert (tmp_path / "nested" / "data" / "convirt.db").is_file()
        assert ping(engine)
    finally:
        engine.dispose()


def test_ping_is_false_when_the_database_is_unreachable() -> None:
    settings = Settings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    engine = create_engine_for(settings)
    try:
        assert ping(engine) is False
    finally:
        engine.dispose()
