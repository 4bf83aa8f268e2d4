"""Distributed bulk ingest: ``convirt ingest PATH --shard I/N`` (or RANK/WORLD_SIZE).

The end-to-end test runs two CPU processes against PostgreSQL, as two machines would
run against a shared database, then kills one rank halfway and runs it again.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.commands.ingest import Shard, Source, parse_shard, shard_from_environment
from app.db import create_engine_for_url, upgrade_database
from app.models import Image
from tests.app.process_support import PROJECT_ROOT, process_env, settings_options


def test_shards_partition_the_input() -> None:
    sources = [Source(Path(f"{i}.png")) for i in range(10)]
    parts = [Shard(i, 3).take(sources) for i in range(3)]
    taken = [s.path for part in parts for s in part]
    assert sorted(taken) == sorted(s.path for s in sources)
    assert len(taken) == len(set(taken))
    assert [s.path.name for s in parts[1]] == ["1.png", "4.png", "7.png"]


@pytest.mark.parametrize("text", ["2", "2/2", "-1/2", "0/0", "a/b"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"shard|invalid literal"):
        parse_shard(text)


def test_the_shard_of_a_torchrun_rank() -> None:
    assert shard_from_environment({"RANK": "3", "WORLD_SIZE": "4"}) == Shard(3, 4)
    assert shard_from_environment({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert shard_from_environment({}) is None


def _ingest_argv(folder: Path, options: list[str], *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.cli",
        "ingest",
        str(folder),
        "--no-progress",
        "--batch-size",
        "1",
        *options,
        *extra,
    ]


def _stored_hashes(url: str) -> list[str]:
    engine = create_engine_for_url(url, pooled=False)
    try:
        with engine.connect() as conn:
            return [str(h) for h in conn.scalars(select(Image.content_hash))]
    finally:
        engine.dispose()


def _kill_after_first_commit(argv: list[str], url: str) -> None:
    """Start ``argv`` and SIGKILL it as soon as the database holds an image."""
    doomed = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=process_env(),
        cwd=PROJECT_ROOT,
    )
    try:
        deadline = time.monotonic() + 300
        while not _stored_hashes(url) and time.monotonic() < deadline:
            assert doomed.poll() is None, "the rank ended before it could be killed"
            time.sleep(0.02)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
    finally:
        if doomed.poll() is None:
            doomed.kill()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_ranks_ingest_exactly_the_input_and_a_killed_rank_fills_its_gap(
    tmp_path: Path,
    postgres_url: str,
    bundle_dir: Path,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    for i, (data, _) in enumerate(kermany_images):
        (folder / f"study{i:02d}.png").write_bytes(data)
    expected = {hashlib.sha256(data).hexdigest() for data, _ in kermany_images}
    rank_one = {hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())[1::2]}

    def options(rank: int) -> list[str]:
        return settings_options(
            data_dir=tmp_path / "data",
            database_url=postgres_url,
            bundle_dir=bundle_dir,
            index_dir=tmp_path / f"index-{rank}",
        )

    # As a deployment does before starting the ranks (they would also migrate, in turn).
    upgrade_database(postgres_url)
    # Rank 1 first, alone, killed once part of its shard is stored.
    _kill_after_first_commit(_ingest_argv(folder, options(1), "--shard", "1/2"), postgres_url)
    partial = set(_stored_hashes(postgres_url))
    assert partial
    assert partial < rank_one  # halfway: some of its shard, nothing of the other's

    # Both ranks together: rank 0 by --shard, rank 1 as torchrun would start it.
    ranks = [
        subprocess.Popen(
            _ingest_argv(folder, options(0), "--shard", "0/2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=process_env(),
            cwd=PROJECT_ROOT,
        ),
        subprocess.Popen(
            _ingest_argv(folder, options(1)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=process_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0"),
            cwd=PROJECT_ROOT,
        ),
    ]
    summaries = []
    for rank in ranks:
        out, err = rank.communicate(timeout=600)
        assert rank.returncode == 0, err[-3000:]
        summaries.append(out.strip().splitlines()[-1])
    assert '"shard": "0/2"' in summaries[0]
    assert '"shard": "1/2"' in summaries[1]
    # The re-run rank found what it had stored before its death and added the rest.
    assert f'"existing": {len(partial)}' in summaries[1]

    stored = _stored_hashes(postgres_url)
    assert len(stored) == len(set(stored))  # no duplicates
    assert set(stored) == expected  # exactly the input
    engine = create_engine_for_url(postgres_url, pooled=False)
    try:
        with engine.connect() as conn:
            images = conn.scalar(select(func.count()).select_from(Image))
    finally:
        engine.dispose()
    assert images == len(kermany_images)
