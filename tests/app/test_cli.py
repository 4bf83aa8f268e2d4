"""The command line: cheap to start (building the parser loads no model), and every process
that listens refuses bad or exposed settings before it does any work."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import COMMAND_MODULES, build_parser
from app.cli import main as cli_main
from app.commands.serve import serving_settings

#: Commands whose module cannot carry their name (``import`` is a Python keyword).
COMMAND_OF_MODULE = {"import_model": "import"}


def test_every_command_is_registered_and_documented() -> None:
    parser = build_parser()
    help_text = parser.format_help()
    for module in COMMAND_MODULES:
        command = COMMAND_OF_MODULE.get(module, module.replace("_", "-"))
        # argparse indents each command; a long name gets its help on the next line.
        assert re.search(rf"^\s+{re.escape(command)}\s", help_text, re.MULTILINE), command


def test_building_the_parser_does_not_import_torch_or_faiss() -> None:
    # A fresh interpreter: this test process has long imported torch through other tests.
    code = (
        "import sys, app.cli\n"
        "app.cli.build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'faiss', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "", f"imported at parser build: {result.stdout.strip()}"


@pytest.fixture
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``CONVIRT_*`` variable of the machine running the tests leaks into Settings."""
    for name in list(os.environ):
        if name.upper().startswith("CONVIRT_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("plain_environment")
def test_serving_settings_refuse_invalid_or_exposed_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    with caplog.at_level(logging.ERROR):
        assert serving_settings(data_dir=data_dir, host="0.0.0.0") is None
        assert "refusing to listen on 0.0.0.0 without API keys" in caplog.text
        assert serving_settings(data_dir=data_dir, port=70000) is None
        assert "invalid settings" in caplog.text
    # Consent opens the address; an option left out (None) keeps the default.
    settings = serving_settings(data_dir=data_dir, host="0.0.0.0", allow_anonymous=True, port=None)
    assert settings is not None
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert not data_dir.exists()


@pytest.mark.usefixtures("plain_environment")
def test_demo_refuses_an_open_address_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo sets these for itself; monkeypatch puts them back afterwards.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    data_dir = tmp_path / "data"
    args = ["demo", "--host", "0.0.0.0", "--data-dir", str(data_dir), "--no-serve"]
    assert cli_main(args) == 2
    assert not data_dir.exists()


@pytest.mark.usefixtures("plain_environment")
def test_the_container_refuses_invalid_settings_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location(
        "convirt_entrypoint", Path(__file__).parents[2] / "docker" / "entrypoint.py"
    )
    assert spec is not None
    assert spec.loader is not None
    entrypoint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entrypoint)
    # main() installs handlers for PID 1; the test process keeps its own.
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    data_dir = tmp_path / "data"
    # An open address alone is no reason to refuse: without keys the container makes one
    # (tests/app/test_entrypoint_key.py). Settings that do not validate are.
    monkeypatch.setenv("CONVIRT_HOST", "0.0.0.0")
    monkeypatch.setenv("CONVIRT_PORT", "not-a-port")
    monkeypatch.setenv("CONVIRT_DATA_DIR", str(data_dir))
    assert entrypoint.main([]) == 2
    assert not data_dir.exists()
