"""Alembic migrations against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from app.commands import db as db_command
from app.db import (
    DEFAULT_MIGRATIONS_DIR,
    MigrationsNotFoundError,
    create_engine_for_url,
    current_revision,
    downgrade_database,
    head_revision,
    upgrade_database,
)
from app.models import Base

#: The newest revision: what a fresh database is upgraded to.
HEAD = "0005"

APP_TABLES = {
    "images",
    "models",
    "embeddings",
    "evaluation_runs",
    "embedding_cache",
    "changes",
    "feed_floor",
    "dicomweb_cursors",
    "dicomweb_series",
}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    engine = create_engine_for_url(url, pooled=False)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str, metadata: sa.MetaData) -> list[object]:
    engine = create_engine_for_url(url, pooled=False)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_head_is_the_latest_revision() -> None:
    assert head_revision() == HEAD


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    assert current_revision(database_url) is None

    upgrade_database(database_url)
    assert current_revision(database_url) == HEAD
    assert _tables(database_url) >= APP_TABLES

    downgrade_database(database_url, "base")
    assert current_revision(database_url) is None
    assert _tables(database_url) & APP_TABLES == set()

    upgrade_database(database_url)
    assert current_revision(database_url) == HEAD
    assert _tables(database_url) >= APP_TABLES


def test_autogenerate_finds_no_difference(database_url: str) -> None:
    upgrade_database(database_url)
    assert _diff(database_url, Base.metadata) == []


def test_autogenerate_sees_drift_in_the_database(database_url: str) -> None:
    # The control for the test above: the comparison does look at indexes and types.
    upgrade_database(database_url)
    engine = create_engine_for_url(database_url, pooled=False)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_images_study_ref"))
    engine.dispose()
    diff = _diff(database_url, Base.metadata)
    assert any(d[0] == "add_index" and d[1].name == "ix_images_study_ref" for d in diff)  # type: ignore[index]

    changed = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["images"].c.source_format.type = sa.String(40)
    type_diffs = [d for d in _diff(database_url, changed) if isinstance(d, list)]
    assert any(change[0][0] == "modify_type" for change in type_diffs)


def test_schema_holds_no_patient_identifier_columns(sqlite_url: str) -> None:
    upgrade_database(sqlite_url)
    engine = create_engine_for_url(sqlite_url, pooled=False)
    inspector = sa.inspect(engine)
    columns = {
        f"{table}.{column['name']}"
        for table in APP_TABLES
        for column in inspector.get_columns(table)
    }
    engine.dispose()
    forbidden = ("patient", "birth", "dob", "accession", "mrn", "sex", "physician", "address")
    assert not [c for c in columns if any(word in c.lower() for word in forbidden)]
    assert "images.content_hash" in columns


def test_cascade_and_check_constraints_exist_after_migration(database_url: str) -> None:
    upgrade_database(database_url)
    engine = create_engine_for_url(database_url, pooled=False)
    inspector = sa.inspect(engine)
    fks = {fk["name"]: fk for fk in inspector.get_foreign_keys("embeddings")}
    checks = {ck["name"] for ck in inspector.get_check_constraints("embeddings")}
    engine.dispose()
    assert fks["fk_embeddings_image_id_images"]["options"].get("ondelete") == "CASCADE"
    assert fks["fk_embeddings_model_id_models"]["referred_table"] == "models"
    assert "ck_embeddings_vector_length" in checks


_RACE_CHILD = """
import sys, time
from pathlib import Path
from app.db import upgrade_database
ready, go = Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
upgrade_database(sys.argv[1])
"""


def test_concurrent_upgrades_take_turns(database_url: str, tmp_path: Path) -> None:
    # Several replicas starting at once each run `upgrade head`. Separate processes,
    # because Alembic's migration context is process-global; they import first and then
    # start together, so that without a lock they do collide.
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_CHILD, database_url, str(tmp_path / f"ready{i}"), str(go)],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [(proc.wait(timeout=120), proc.communicate()[1]) for proc in procs]
    assert [rc for rc, _ in results] == [0, 0, 0], [err for _, err in results]
    assert current_revision(database_url) == HEAD
    assert _diff(database_url, Base.metadata) == []


def test_missing_migrations_folder_is_a_typed_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str
) -> None:
    monkeypatch.setattr("app.db.DEFAULT_MIGRATIONS_DIR", tmp_path / "nowhere")
    with pytest.raises(MigrationsNotFoundError) as caught:
        upgrade_database(sqlite_url)
    assert caught.value.code == "migrations_not_found"
    assert "pip install -e ." in str(caught.value)


def test_current_revision_does_not_create_a_sqlite_file(tmp_path: Path) -> None:
    target = tmp_path / "absent" / "convirt.db"
    assert current_revision(f"sqlite:///{target}") is None
    assert not target.parent.exists()


def _db_cli() -> Callable[[list[str]], int]:
    parser = argparse.ArgumentParser(prog="convirt")
    db_command.register(parser.add_subparsers(dest="command", required=True))

    def run(argv: list[str]) -> int:
        args = parser.parse_args(argv)
        result: int = args.func(args)
        return result

    return run


def test_db_command_upgrade_current_downgrade(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _db_cli()
    assert run(["db", "current", "--database-url", sqlite_url]) == 0
    assert capsys.readouterr().out.strip() == "none (not migrated)"
    assert run(["db", "current", "--check", "--database-url", sqlite_url]) == 1
    capsys.readouterr()

    assert run(["db", "upgrade", "--database-url", sqlite_url]) == 0
    assert run(["db", "current", "--check", "--database-url", sqlite_url]) == 0
    assert capsys.readouterr().out.strip() == f"{HEAD} (head)"
    assert _tables(sqlite_url) >= APP_TABLES

    assert run(["db", "downgrade", "base", "--database-url", sqlite_url]) == 0
    assert current_revision(sqlite_url) is None


def test_db_command_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONVIRT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CONVIRT_DATABASE_URL", raising=False)
    run = _db_cli()
    assert run(["db", "upgrade"]) == 0
    assert (tmp_path / "data" / "convirt.db").is_file()
    assert run(["db", "current"]) == 0
    assert capsys.readouterr().out.strip() == f"{HEAD} (head)"


def test_db_command_reports_an_unreachable_database(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = _db_cli()
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    url = "postgresql+psycopg://nobody:secret@127.0.0.1:1/none"
    assert run(["db", "upgrade", "--database-url", url]) == 1
    assert "db upgrade failed" in caplog.text
    assert "secret" not in caplog.text


def test_alembic_command_line_uses_the_ini_file(tmp_path: Path) -> None:
    # `alembic -c migrations/alembic.ini ...` is how new revisions get written by hand.
    env = {**os.environ, "CONVIRT_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("CONVIRT_DATABASE_URL", None)
    ini = DEFAULT_MIGRATIONS_DIR / "alembic.ini"
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert current_revision(f"sqlite:///{tmp_path / 'convirt.db'}") == HEAD
    assert "Running upgrade" in done.stderr


def _insert_image(conn: sa.Connection, n: int) -> int:
    """An image row (and its embedding under model "m") with content hash number ``n``."""
    digest = f"{n:064x}"
    image_id = conn.execute(
        sa.text(
            "INSERT INTO images (content_hash, source_format, width, height, labels, "
            "image_path, thumbnail_path) VALUES (:h, 'png', 2, 2, '{}', :p, :p) RETURNING id"
        ),
        {"h": digest, "p": f"images/{digest}.png"},
    ).scalar_one()
    conn.execute(
        sa.text("INSERT INTO embeddings (image_id, model_id, dim, vector) VALUES (:i, 'm', 1, :v)"),
        {"i": image_id, "v": b"\x00\x00\x80\x3f"},
    )
    return int(image_id)


def _rows(conn: sa.Connection) -> tuple[list[int], list[int]]:
    images = [int(i) for i in conn.execute(sa.text("SELECT id FROM images ORDER BY id")).scalars()]
    embedded = [
        int(i)
        for i in conn.execute(
            sa.text("SELECT image_id FROM embeddings ORDER BY image_id")
        ).scalars()
    ]
    return images, embedded


def test_ids_of_deleted_newest_rows_are_never_reused(database_url: str) -> None:
    upgrade_database(database_url)
    engine = create_engine_for_url(database_url, pooled=False)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO models (id, name, dim, config, is_active) "
                    "VALUES ('m', 'm', 1, '{}', true)"
                )
            )
            first = [_insert_image(conn, n) for n in range(3)]
            conn.execute(sa.text("DELETE FROM images WHERE id = :i"), {"i": first[-1]})
            run = conn.execute(
                sa.text(
                    "INSERT INTO evaluation_runs (model_id, protocol, params, status, progress) "
                    "VALUES ('m', 'p', '{}', 'queued', 0) RETURNING id"
                )
            ).scalar_one()
            conn.execute(sa.text("DELETE FROM evaluation_runs WHERE id = :i"), {"i": run})
        with engine.begin() as conn:
            again = _insert_image(conn, 99)
            run_again = conn.execute(
                sa.text(
                    "INSERT INTO evaluation_runs (model_id, protocol, params, status, progress) "
                    "VALUES ('m', 'p', '{}', 'queued', 0) RETURNING id"
                )
            ).scalar_one()
        assert again > first[-1]
        assert run_again > run
    finally:
        engine.dispose()


def test_upgrade_to_0002_keeps_every_row_and_embedding_on_sqlite(sqlite_url: str) -> None:
    upgrade_database(sqlite_url, "0001")
    engine = create_engine_for_url(sqlite_url, pooled=False)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO models (id, name, dim, config, is_active) "
                    "VALUES ('m', 'm', 1, '{}', 1)"
                )
            )
            ids = [_insert_image(conn, n) for n in range(5)]
            conn.execute(sa.text("DELETE FROM images WHERE id = :i"), {"i": ids[1]})
            before = _rows(conn)
        assert before == ([1, 3, 4, 5], [1, 3, 4, 5])

        upgrade_database(sqlite_url, "0002")
        assert current_revision(sqlite_url) == "0002"
        with engine.begin() as conn:
            assert _rows(conn) == before
            # The cascade still works on the rebuilt table.
            conn.execute(sa.text("DELETE FROM images WHERE id = 5"))
            assert _rows(conn) == ([1, 3, 4], [1, 3, 4])
            assert _insert_image(conn, 50) == 6

        downgrade_database(sqlite_url, "0001")
        with engine.begin() as conn:
            assert _rows(conn) == ([1, 3, 4, 6], [1, 3, 4, 6])
    finally:
        engine.dispose()
