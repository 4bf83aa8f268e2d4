"""The command line stays cheap to start: building the parser must not load the models."""

from __future__ import annotations

import subprocess
import sys

from app.cli import COMMAND_MODULES, build_parser


def test_every_command_is_registered_and_documented() -> None:
    parser = build_parser()
    help_text = parser.format_help()
    for module in COMMAND_MODULES:
        assert module.replace("_", "-") in help_text


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
