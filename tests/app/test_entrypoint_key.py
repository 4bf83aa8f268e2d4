"""The image entrypoint's first-start API key (docker/entrypoint.py), without Docker.

A bare ``docker compose up`` sets no key; the entrypoint must then serve with a key it
generates once, keeps in the data volume (mode 0600) and prints once, while a configured
``CONVIRT_API_KEYS`` (or consent to anonymous access) wins.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from app.settings import Settings

ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "entrypoint.py"


@pytest.fixture
def entrypoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ModuleType]:
    for name in list(os.environ):
        if name.upper().startswith("CONVIRT_"):
            monkeypatch.delenv(name)
    # main() sets the root logger's level: restored after the test.
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)
    # As in the image: listening on every address, data in the volume.
    monkeypatch.setenv("CONVIRT_HOST", "0.0.0.0")
    monkeypatch.setenv("CONVIRT_DATA_DIR", str(tmp_path / "data"))
    # main() exports the key it serves with for `convirt serve`: set and removed here so
    # that the undo at teardown removes the one main() set, and later tests see none.
    monkeypatch.setenv("CONVIRT_API_KEYS", "")
    monkeypatch.delenv("CONVIRT_API_KEYS")
    spec = importlib.util.spec_from_file_location("convirt_entrypoint", ENTRYPOINT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("convirt_entrypoint", None)


def _run_main(
    entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch, command: str = "serve"
) -> dict[str, Any]:
    """Run ``main([command])`` up to its exec of ``convirt serve``; what it would exec."""
    seen: dict[str, Any] = {}

    def fake_execv(path: str, argv: list[str]) -> None:
        seen.update(argv=argv, keys=os.environ.get("CONVIRT_API_KEYS"))

    def fake_prepare(settings: Settings, *, initialise: bool = True) -> None:
        seen.update(settings=settings, initialise=initialise)

    monkeypatch.setattr(entrypoint, "prepare", fake_prepare)
    # main() installs PID 1's signal handlers: not in the test process.
    monkeypatch.setattr(entrypoint.signal, "signal", lambda signum, handler: None)
    monkeypatch.setattr(entrypoint.os, "execv", fake_execv)
    seen["status"] = entrypoint.main([command])
    return seen


def test_a_bare_first_start_generates_keeps_and_prints_one_key(
    entrypoint: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    first = _run_main(entrypoint, monkeypatch)
    key_file = tmp_path / "data" / "api-key"
    key = key_file.read_text().strip()
    assert len(key) >= 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # It serves (exec of `convirt serve`) with that key, and the steps saw it too.
    assert first["argv"][-1] == "serve"
    assert first["keys"] == key
    assert first["settings"].api_keys == [key]
    assert sum(key in record.getMessage() for record in caplog.records) == 1

    # A restart uses the same key and does not print it again.
    monkeypatch.delenv("CONVIRT_API_KEYS")
    caplog.clear()
    second = _run_main(entrypoint, monkeypatch)
    assert second["keys"] == key
    assert key not in caplog.text
    assert str(key_file) in caplog.text


def test_configured_keys_override_the_volume_key(
    entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    configured = "c" * 24
    monkeypatch.setenv("CONVIRT_API_KEYS", configured)
    seen = _run_main(entrypoint, monkeypatch)
    assert seen["keys"] == configured
    assert not (tmp_path / "data" / "api-key").exists()


def test_anonymous_consent_generates_no_key(
    entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONVIRT_ALLOW_ANONYMOUS", "true")
    seen = _run_main(entrypoint, monkeypatch)
    assert seen["keys"] is None
    assert seen["settings"].api_keys == []
    assert not (tmp_path / "data" / "api-key").exists()


def test_a_key_file_readable_by_others_is_made_private(
    entrypoint: ModuleType, tmp_path: Path
) -> None:
    key_file = tmp_path / "data" / "api-key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text("k" * 30 + "\n")
    key_file.chmod(0o644)
    assert entrypoint.volume_api_key(Settings()) == "k" * 30
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_a_broken_key_file_stops_the_start(
    entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "data" / "api-key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text("short\n")
    seen = _run_main(entrypoint, monkeypatch)
    assert seen["status"] == 1
    assert "argv" not in seen  # never served


# --- init and serve: who migrates and builds the demo -----------------------------------------


def test_init_prepares_then_exits_without_serving(
    entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = _run_main(entrypoint, monkeypatch, "init")
    assert seen["status"] == 0
    assert seen["initialise"] is True
    assert "argv" not in seen
    # The key the replicas will read is on the volume once init has run.
    assert (tmp_path / "data" / "api-key").exists()


def test_replicas_after_init_only_wait_for_the_database(
    entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVIRT_INIT", "0")
    seen = _run_main(entrypoint, monkeypatch)
    assert seen["initialise"] is False
    assert seen["argv"][-1] == "serve"
    # `init` prepares whatever CONVIRT_INIT says: it is the service that does it.
    assert _run_main(entrypoint, monkeypatch, "init")["initialise"] is True


def test_prepare_without_initialise_runs_no_step(
    entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    steps: list[list[str]] = []
    monkeypatch.setattr(entrypoint, "run_step", lambda argv: steps.append(list(argv)))
    monkeypatch.setenv("CONVIRT_DEMO", "0")
    settings = Settings(data_dir=tmp_path / "data")
    entrypoint.prepare(settings, initialise=False)
    assert steps == []
    entrypoint.prepare(settings, initialise=True)
    assert steps == [["db", "upgrade"]]
