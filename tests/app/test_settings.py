"""Settings: defaults, CONVIRT_* environment variables and validation errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.settings import InsecureExposureError, Settings

KEY_A = "k" * 16
KEY_B = "0123456789abcdef-long-key"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's or CI's own CONVIRT_* variables must not leak into these tests.
    for name in list(os.environ):
        if name.upper().startswith("CONVIRT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_live_under_data_in_the_working_directory(tmp_path: Path) -> None:
    settings = Settings()
    data = tmp_path / "data"
    assert settings.data_dir == data
    assert settings.database_url == f"sqlite:///{data / 'convirt.db'}"
    assert settings.bundle_dir == data / "bundle"
    assert settings.index_dir == data / "index"
    assert settings.is_sqlite
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.index_factory == "Flat"
    assert settings.api_keys == []
    assert not settings.allow_anonymous
    assert not settings.store_originals
    assert settings.max_upload_bytes == 50 * 1024 * 1024
    assert settings.max_query_chars == 1000
    assert settings.k_max == 1000
    assert settings.log_level == "INFO"
    # Building settings does no I/O: the data directory is created by whoever writes there.
    assert not data.exists()


def test_data_dir_moves_every_derived_path(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "elsewhere")
    assert settings.database_url == f"sqlite:///{tmp_path / 'elsewhere' / 'convirt.db'}"
    assert settings.bundle_dir == tmp_path / "elsewhere" / "bundle"
    assert settings.index_dir == tmp_path / "elsewhere" / "index"


def test_relative_paths_are_made_absolute_against_the_cwd(tmp_path: Path) -> None:
    settings = Settings(data_dir=Path("rel"), bundle_dir=Path("bundles/v2"))
    assert settings.data_dir == tmp_path / "rel"
    assert settings.bundle_dir == tmp_path / "bundles" / "v2"
    assert settings.index_dir == tmp_path / "rel" / "index"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVIRT_DATA_DIR", str(tmp_path / "env-data"))
    monkeypatch.setenv("CONVIRT_API_KEYS", f" {KEY_A} ,{KEY_B},, ")
    monkeypatch.setenv("CONVIRT_ALLOW_ANONYMOUS", "true")
    monkeypatch.setenv("CONVIRT_PORT", "9001")
    monkeypatch.setenv("CONVIRT_INDEX_FACTORY", "HNSW32")
    monkeypatch.setenv("CONVIRT_STORE_ORIGINALS", "1")
    monkeypatch.setenv("CONVIRT_LOG_LEVEL", "debug")
    monkeypatch.setenv("CONVIRT_INDEX_DIR", "")
    settings = Settings()
    assert settings.api_keys == [KEY_A, KEY_B]
    assert settings.allow_anonymous
    assert settings.port == 9001
    assert settings.index_factory == "HNSW32"
    assert settings.store_originals
    assert settings.log_level == "DEBUG"
    assert settings.index_dir == tmp_path / "env-data" / "index"
    assert settings.database_url.endswith("/env-data/convirt.db")


def test_keywords_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVIRT_PORT", "9001")
    assert Settings(port=9002).port == 9002


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql+psycopg://u:p@db:5432/convirt", "postgresql+psycopg://u:p@db:5432/convirt"),
        ("postgresql://u:p@db/convirt", "postgresql+psycopg://u:p@db/convirt"),
        ("postgres://u:p%40ss@db/convirt", "postgresql+psycopg://u:p%40ss@db/convirt"),
        ("sqlite:////var/lib/convirt/x.db", "sqlite:////var/lib/convirt/x.db"),
    ],
)
def test_database_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    monkeypatch.setenv("CONVIRT_DATABASE_URL", given)
    settings = Settings()
    assert settings.database_url == expected
    assert settings.is_sqlite == expected.startswith("sqlite")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("database_url", "mysql://u@h/db", "not supported"),
        ("database_url", "postgresql+psycopg2://u@h/db", "psycopg2"),
        ("database_url", "postgresql+psycopg://u@h", "names no database"),
        ("database_url", "not a url", "not a database URL"),
        ("port", "0", "greater than or equal to 1"),
        ("port", "70000", "less than or equal to 65535"),
        ("api_keys", "short", "shorter than 16 characters"),
        ("max_upload_bytes", "0", "greater than 0"),
        ("k_max", "0", "greater than or equal to 1"),
        ("encode_concurrency", "0", "greater than or equal to 1"),
        ("thumbnail_size", "4", "greater than or equal to 16"),
        ("log_level", "chatty", "DEBUG"),
        ("index_factory", "  ", "factory string is empty"),
    ],
)
def test_invalid_values_are_refused_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"CONVIRT_{field.upper()}", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    errors = caught.value.errors()
    assert [e["loc"] for e in errors] == [(field,)]
    assert message in str(caught.value)


def test_api_keys_and_database_password_stay_out_of_repr() -> None:
    settings = Settings(api_keys=[KEY_B], database_url="postgresql://u:hunter2@db/convirt")
    assert KEY_B not in repr(settings)
    assert "hunter2" not in repr(settings)
    with pytest.raises(ValidationError) as caught:
        Settings(api_keys=[KEY_B, "tiny-secret"])
    assert "tiny-secret" not in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        Settings(database_url="mysql://u:hunter2@db/convirt")
    assert "hunter2" not in str(caught.value)


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Settings(data_directory="/tmp/x")  # type: ignore[call-arg]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_may_serve_without_keys(host: str) -> None:
    settings = Settings(host=host)
    assert settings.is_loopback
    settings.ensure_safe_exposure()


def test_exposed_host_needs_keys_or_explicit_consent() -> None:
    exposed = Settings(host="0.0.0.0")
    assert not exposed.is_loopback
    with pytest.raises(InsecureExposureError) as caught:
        exposed.ensure_safe_exposure()
    assert caught.value.code == "insecure_exposure"
    assert "CONVIRT_API_KEYS" in str(caught.value)
    Settings(host="0.0.0.0", api_keys=[KEY_A]).ensure_safe_exposure()
    Settings(host="0.0.0.0", allow_anonymous=True).ensure_safe_exposure()
    with pytest.raises(InsecureExposureError):
        Settings(host="convirt.example.org").ensure_safe_exposure()


def test_importing_the_settings_module_reads_nothing(tmp_path: Path) -> None:
    # An invalid environment must not break `import app.settings`: only Settings() reads it.
    env = {
        "CONVIRT_PORT": "not-a-port",
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    done = subprocess.run(
        [sys.executable, "-c", "import app.settings, app.db, app.models, app.errors"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "data").exists()


def test_pacs_connector_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVIRT_DICOM_AE_TITLE", " RETRIEVAL ")
    monkeypatch.setenv("CONVIRT_DICOM_PORT", "4242")
    monkeypatch.setenv("CONVIRT_DICOM_CALLING_AES", "ORTHANC, MODALITY1,,")
    monkeypatch.setenv("CONVIRT_DICOMWEB_TOKEN", "s3cret-bearer-token")
    monkeypatch.setenv(
        "CONVIRT_VIEWER_URL_TEMPLATE",
        "http://pacs/stone-webviewer/index.html?study={study_instance_uid}",
    )
    settings = Settings()
    assert settings.dicom_ae_title == "RETRIEVAL"
    assert settings.dicom_port == 4242
    assert settings.dicom_calling_aes == ["ORTHANC", "MODALITY1"]
    assert not settings.dicom_accept_any_caller
    assert settings.viewer_url("1.2.840.1") == (
        "http://pacs/stone-webviewer/index.html?study=1.2.840.1"
    )
    assert settings.viewer_url(None) is None
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dicom_ae_title", ""),
        ("dicom_ae_title", "SEVENTEEN-CHARS-X"),
        ("dicom_ae_title", "BACK\\SLASH"),
        ("dicom_calling_aes", "GOOD,TOO-LONG-CALLING-AE"),
        ("viewer_url_template", "javascript:alert(1)//{study_instance_uid}"),
        ("viewer_url_template", "http://pacs/?patient={patient_id}"),
        ("viewer_url_template", "http://pacs/viewer"),
        ("viewer_url_template", "http://pacs/?s={study_instance_uid:>99999999}"),
        ("viewer_url_template", "http://pacs/?s={study_instance_uid.__class__}"),
        ("viewer_url_template", "http://pacs/?s={study_instance_uid!r}"),
        ("viewer_url_template", "http://pacs/?s={study_instance_uid"),
    ],
)
def test_bad_pacs_connector_settings_are_refused(field: str, value: str) -> None:
    given: dict[str, Any] = {field: value}
    with pytest.raises(ValidationError):
        Settings(**given)


def test_dicomweb_auth_is_basic_or_bearer_never_both() -> None:
    with pytest.raises(ValidationError, match="not both"):
        Settings(dicomweb_token="t" * 20, dicomweb_username="u", dicomweb_password="p")
    with pytest.raises(ValidationError, match="both a user name and a password"):
        Settings(dicomweb_username="u")
    assert Settings().viewer_url("1.2.3") is None


def test_every_setting_has_a_row_in_the_readme_table() -> None:
    """A setting added without its row in the README's table is invisible to operators."""
    readme = Path(__file__).resolve().parents[2] / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    # A table row's first cell names the variables it documents.
    first_cells = [line.split("|")[1] for line in lines if line.startswith("| `CONVIRT_")]
    undocumented = [
        name
        for name in Settings.model_fields
        if not any(f"`CONVIRT_{name.upper()}`" in cell for cell in first_cells)
    ]
    assert undocumented == []
