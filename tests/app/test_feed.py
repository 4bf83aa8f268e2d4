"""The change feed and its followers, within one test process.

Two apps on one database stand for two processes: each has its own index directory and
its own follower; a change made through one must reach the other's searches. The
outbox-trap test drives two raw writer transactions whose commits would interleave out
of sequence order, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import create_engine_for_url, session_factory, upgrade_database
from app.models import Change, EncoderModel, Image, utcnow
from app.services import feed, reconcile
from app.services.follower import PRUNED_PAST
from app.services.snapshot import FEED_POSITION_NAME
from app.settings import Settings
from model.bundle import EncoderBundle
from tests.app.service_support import (
    assert_consistent,
    is_problem,
    make_settings,
    noise_png,
    running_app,
    runtime_of,
    upload,
)

#: How soon a change must be searchable in another process.
VISIBLE_WITHIN_S = 2.0


def _wait_for(condition: Callable[[], bool], within: float = VISIBLE_WITHIN_S) -> float:
    """Seconds until ``condition`` held; fails the test after ``within`` seconds."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            raise AssertionError(f"not true within {within} s")
        time.sleep(0.02)
    return time.monotonic() - start


def _searchable_ids(client: TestClient) -> set[int]:
    response = client.post("/search/text", json={"query": "effusion", "k": 100})
    assert response.status_code == 200, response.text
    return {hit["image_id"] for hit in response.json()["hits"]}


def _replica(
    tmp_path: Path, name: str, database_url: str, bundle_dir: Path, **extra: Any
) -> Settings:
    """Settings of one more process on the same database, with an index of its own."""
    return make_settings(
        tmp_path / "data",
        database_url,
        bundle_dir,
        index_dir=tmp_path / f"index-{name}",
        **extra,
    )


def test_writers_commit_in_sequence_order(database_url: str) -> None:
    """The outbox trap: writer A takes a number and stays open; writer B, later, must not
    commit a higher number before A commits, or a follower reading between them would
    move past A's number and never apply A's change."""
    upgrade_database(database_url)
    engine = create_engine_for_url(database_url)
    sessions = session_factory(engine)
    seen: list[int] = []

    def follow() -> None:
        with sessions() as session:
            after = seen[-1] if seen else 0
            seen.extend(r.seq for r in feed.read_tail(session, after, 100))

    try:
        first = sessions()
        first.begin()
        feed.record_removes(first, [1])
        first.flush()
        second_committed = threading.Event()

        def second_writer() -> None:
            with sessions() as session, session.begin():
                feed.record_removes(session, [2])
            second_committed.set()

        writer = threading.Thread(target=second_writer)
        writer.start()
        # B waits at the feed's lock (PostgreSQL) or the database's (SQLite) while A is open.
        assert not second_committed.wait(1.0)
        follow()
        assert seen == []
        first.commit()
        first.close()
        writer.join(timeout=30)
        assert second_committed.is_set()
        follow()
        follow()
        with sessions() as session:
            everything = list(session.scalars(select(Change.seq).order_by(Change.seq)))
        # The follower saw every committed record, each once, in order.
        assert seen == everything
        assert len(everything) == 2
    finally:
        engine.dispose()


def test_a_change_reaches_the_other_process_within_two_seconds(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    one = _replica(tmp_path, "one", database_url, bundle_dir)
    two = _replica(tmp_path, "two", database_url, bundle_dir)
    with running_app(one, bundle) as first, running_app(two, bundle) as second:

        def indexed(client: TestClient) -> list[int]:
            return runtime_of(client).index.ids().tolist()

        created = [r["id"] for r in upload(first, [noise_png(1), noise_png(2)]).json()["results"]]
        # The writer reads its own write at once; the other process within the bound.
        assert _searchable_ids(first) == set(created)
        _wait_for(lambda: _searchable_ids(second) == set(created))
        assert first.delete(f"/images/{created[0]}").status_code == 204
        # Searches drop deleted rows at the database lookup anyway: check the index itself.
        _wait_for(lambda: indexed(second) == [created[1]])
        more = upload(second, [noise_png(3)]).json()["results"][0]["id"]
        _wait_for(lambda: _searchable_ids(first) == {created[1], more})
        _wait_for(lambda: indexed(first) == indexed(second) == [created[1], more])
        for client in (first, second):
            assert client.get("/ready").status_code == 200
            assert_consistent(runtime_of(client))


def test_a_restart_loads_the_snapshot_and_replays_only_the_tail(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        upload(client, [noise_png(4), noise_png(5)])
    position = json.loads((settings.index_dir / FEED_POSITION_NAME).read_text())
    # Another process adds and deletes while this one is down.
    other = _replica(tmp_path, "other", database_url, bundle_dir)
    with running_app(other, bundle) as client:
        results = upload(client, [noise_png(6), noise_png(7)]).json()["results"]
        assert client.delete(f"/images/{results[0]['id']}").status_code == 204
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert not runtime.report.rebuilt
        assert runtime.report.reason is None
        # Two adds and one removal past the snapshot: the position moved by three.
        assert runtime.index.sequence == position["sequence"] + 3
        assert runtime.index.ntotal == 3
        assert_consistent(runtime)


def test_a_position_of_another_save_is_not_trusted(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        ids = [r["id"] for r in upload(client, [noise_png(8), noise_png(9)]).json()["results"]]
    path = settings.index_dir / FEED_POSITION_NAME
    position = json.loads(path.read_text())
    # A position far ahead, as if the index had applied changes it has not: were it
    # trusted, the index would never get them. It names another save, so it is not.
    position["sequence"] += 1000
    position["checksum"] = "sha256:" + "0" * 64
    path.write_text(json.dumps(position))
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert runtime.index.ids().tolist() == sorted(ids)
        assert runtime.index.sequence < 1000
        assert_consistent(runtime)


def test_a_snapshot_the_database_disagrees_with_is_rebuilt(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        ids = [r["id"] for r in upload(client, [noise_png(10), noise_png(11)]).json()["results"]]
        runtime = runtime_of(client)
        # A row deleted behind the feed's back (a restored backup, a hand-made DELETE):
        # the replay cannot know, the count check after it does.
        runtime.follower.stop()
        with runtime.sessions() as session, session.begin():
            session.execute(delete(Image).where(Image.id == ids[0]))
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert runtime.report.rebuilt
        assert runtime.report.reason == "the index holds 2 vectors, the database 1"
        # The activation and two adds: the rebuild starts from the feed's head.
        assert runtime.index.sequence == 3
        assert runtime.follower.count_pending() == 0
        assert_consistent(runtime)


def test_ready_and_metrics_report_the_lag(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    one = _replica(tmp_path, "one", database_url, bundle_dir)
    two = _replica(tmp_path, "two", database_url, bundle_dir)
    with running_app(one, bundle) as first, running_app(two, bundle) as second:
        follower = runtime_of(second).follower
        follower.stop()  # this process stops following: it falls behind
        upload(first, [noise_png(12)])
        time.sleep(0.3)
        body = second.get("/ready").json()
        assert (body["feed_lag_changes"], body["index_vectors"]) == (1, 0)
        assert body["feed_lag_seconds"] >= 0.3
        metrics = second.get("/metrics").text
        assert "convirt_feed_lag_changes 1.0" in metrics
        lag_line = next(
            line for line in metrics.splitlines() if line.startswith("convirt_feed_lag_seconds ")
        )
        assert float(lag_line.split()[1]) >= 0.3
        follower.start()
        _wait_for(lambda: second.get("/ready").json()["feed_lag_changes"] == 0)
        body = second.get("/ready").json()
        assert body["index_vectors"] == 1
        assert body["feed_lag_seconds"] < 1.0


def test_ready_is_503_while_the_index_lags(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = _replica(tmp_path, "one", database_url, bundle_dir)
    settings = settings.model_copy(update={"feed_max_lag_s": 0.3})
    with running_app(settings, bundle) as client:
        assert client.get("/ready").status_code == 200
        follower = runtime_of(client).follower
        follower.stop()
        time.sleep(0.5)
        is_problem(client.get("/ready"), 503, "index_lagging")
        follower.start()
        _wait_for(lambda: client.get("/ready").status_code == 200)


def test_a_model_switch_reaches_the_follower(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        with runtime.sessions() as session, session.begin():
            session.add(EncoderModel(id="sha256:" + "1" * 64, name="other", dim=4))
            session.flush()
            feed.record_switch(session, "sha256:" + "1" * 64)
        _wait_for(lambda: runtime.follower.switched_to == "sha256:" + "1" * 64)
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json()["code"] == "model_switched"


def test_feed_records_hold_no_vector_and_replay_is_harmless(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        ids = [r["id"] for r in upload(client, [noise_png(13), noise_png(14)]).json()["results"]]
        before = runtime.index.ids().copy()
        # Replay the whole feed again from the start: nothing changes.
        with runtime.index.applying():
            runtime.index.sequence = 0
        runtime.follower.catch_up()
        np.testing.assert_array_equal(runtime.index.ids(), before)
        assert sorted(ids) == before.tolist()
        assert not runtime.index.stale_reason


def test_two_processes_registering_one_model_both_start(
    database_url: str, bundle: EncoderBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers of `convirt serve --workers 2` on a fresh database insert the same model
    row: the one that loses the race reads the winner's row instead of failing to start."""
    upgrade_database(database_url)
    engine = create_engine_for_url(database_url)
    sessions = session_factory(engine)
    try:
        assert reconcile.register_model(sessions, bundle) is True
        # The other process looked before the first one committed: it did not see the row.
        real_get = Session.get
        blind = [True]

        def get_once_blind(self: Session, entity: Any, ident: Any, **kwargs: Any) -> Any:
            if blind and entity is EncoderModel:
                blind.clear()
                return None
            return real_get(self, entity, ident, **kwargs)

        monkeypatch.setattr(Session, "get", get_once_blind)
        assert reconcile.register_model(sessions, bundle) is False
        assert not blind
        with sessions() as session:
            rows = session.scalars(select(EncoderModel)).all()
        assert [(row.id, row.is_active) for row in rows] == [(bundle.model_id, True)]
    finally:
        engine.dispose()


def _feed_rows(sessions: Callable[[], Session]) -> list[int]:
    with sessions() as session:
        return list(session.scalars(select(Change.seq).order_by(Change.seq)))


def test_pruning_keeps_the_newest_record_and_raises_the_floor(database_url: str) -> None:
    upgrade_database(database_url)
    engine = create_engine_for_url(database_url)
    sessions = session_factory(engine)
    try:
        with sessions() as session, session.begin():
            # Nothing to prune in an empty feed.
            assert feed.prune(session, utcnow() + dt.timedelta(days=1)) == 0
            assert feed.floor(session) == 0
            feed.record_adds(session, "sha256:" + "a" * 64, [1, 2, 3])
        first = _feed_rows(sessions)
        with sessions() as session, session.begin():
            # Records newer than the cut stay.
            assert feed.prune(session, utcnow() - dt.timedelta(days=1)) == 0
        with sessions() as session, session.begin():
            # In steps: the oldest first.
            assert feed.prune(session, utcnow() + dt.timedelta(days=1), limit=1) == 1
            assert feed.floor(session) == first[0]
        with sessions() as session, session.begin():
            # Every record is older than this cut, but the newest one stays: the head
            # must not go back.
            assert feed.prune(session, utcnow() + dt.timedelta(days=1)) == 1
        with sessions() as session:
            assert feed.floor(session) == first[1]
            assert feed.head(session) == first[2]
        assert _feed_rows(sessions) == [first[2]]
        with sessions() as session, session.begin():
            feed.record_removes(session, [2])
            assert feed.prune(session, utcnow() + dt.timedelta(days=1)) == 1
        with sessions() as session:
            # The floor only rises, numbers are never handed out again.
            assert feed.floor(session) == first[2]
            assert feed.read_tail(session, feed.floor(session), 10)[0].op == "remove"
            assert feed.head(session) > first[2]
    finally:
        engine.dispose()


def test_a_follower_behind_the_pruned_floor_rebuilds_its_index(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    other = _replica(tmp_path, "other", database_url, bundle_dir, feed_retention_s=0.001)
    with running_app(settings, bundle) as client, running_app(other, bundle) as writer:
        runtime = runtime_of(client)
        upload(client, [noise_png(30)])
        _wait_for(lambda: runtime_of(writer).index.ntotal == 1)
        # This process stops following (as if it hung); the other adds and deletes, and
        # the records it missed are pruned.
        runtime.follower.stop()
        results = upload(writer, [noise_png(31), noise_png(32)]).json()["results"]
        assert writer.delete(f"/images/{results[0]['id']}").status_code == 204
        time.sleep(0.01)
        runtime_of(writer).prune_feed()
        with runtime.sessions() as session:
            assert feed.floor(session) > runtime.index.sequence
        runtime.follower.catch_up()
        assert runtime.index.stale_reason == PRUNED_PAST
        # The next maintenance round rebuilds from the stored embeddings.
        runtime.maintain()
        assert runtime.index.stale_reason is None
        assert runtime.index.ntotal == 2
        assert results[1]["id"] in _searchable_ids(client)
        assert_consistent(runtime)


def test_a_snapshot_below_the_pruned_floor_is_not_replayed(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        stored = upload(client, [noise_png(33), noise_png(34)]).json()["results"]
    # Another process deletes one and adds two while this one is down, and the feed is
    # pruned down to its newest record: replayed, the snapshot would hold as many vectors
    # as the database, but the deleted image's instead of the first added one's.
    other = _replica(tmp_path, "other", database_url, bundle_dir, feed_retention_s=0.001)
    with running_app(other, bundle) as writer:
        assert writer.delete(f"/images/{stored[0]['id']}").status_code == 204
        added = upload(writer, [noise_png(35), noise_png(36)]).json()["results"]
        time.sleep(0.01)
        runtime_of(writer).prune_feed()
        with runtime_of(writer).sessions() as session:
            assert feed.floor(session) > 0
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        # Replaying from the snapshot would have missed the removal.
        assert runtime.report.rebuilt
        expected = sorted([stored[1]["id"], added[0]["id"], added[1]["id"]])
        assert runtime.index.ids().tolist() == expected
        assert_consistent(runtime)


def test_retention_zero_never_prunes(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir, feed_retention_s=0)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        upload(client, [noise_png(37), noise_png(38)])
        before = _feed_rows(runtime.sessions)
        assert runtime.prune_feed() == 0
        assert _feed_rows(runtime.sessions) == before
