"""The service's settings: one pydantic-settings class, read from ``CONVIRT_*`` variables.

Nothing is read at import: the caller builds ``Settings()`` (from the environment) or
``Settings(data_dir=..., ...)`` (tests) and hands it to ``create_app(settings)`` or a
command. Keyword arguments win over the environment.

Paths. ``data_dir`` defaults to ``./data``, relative to the working directory of the
process that builds the settings (it is made absolute then, so a later ``chdir`` does not
move it). A per-user location such as ``~/.local/share/convirt`` was the alternative; the
working directory won because a checkout, a container volume mounted at the working
directory and a test's temporary directory all behave the same. Everything the service
writes lives below it unless configured otherwise:

- ``database_url``: ``sqlite:///{data_dir}/convirt.db`` (the embedded default);
  ``CONVIRT_DATABASE_URL=postgresql+psycopg://user:pass@host/db`` switches to PostgreSQL
  (``postgresql://`` and ``postgres://`` are read as psycopg 3 URLs).
- ``bundle_dir``: ``{data_dir}/bundle``, the encoder bundle to load.
- ``index_dir``: ``{data_dir}/index``, the saved vector index.
- de-identified images and thumbnails: under ``data_dir`` (paths in the database are
  relative to it).
- ``evaluation_roots``: ``[{data_dir}/evaluation]``, the only folders whose files
  ``POST /evaluations`` may read.
"""

from __future__ import annotations

import ipaddress
import string
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app.errors import AppError
from model.inputs.decode import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MIN_SIDE

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

#: Shortest API key accepted: shorter keys are guessable.
MIN_API_KEY_CHARS = 16

_MIB = 1024 * 1024

#: Host names answered by default: loopback only, whatever the port.
DEFAULT_ALLOWED_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")
#: Folder under the data directory that evaluations may read by default.
EVALUATION_DIR = "evaluation"


def check_ae_title(value: str) -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, no backslash (PS3.5 6.2).

    Raises:
        ValueError: the title is empty, too long or holds a forbidden character.
    """
    title = value.strip()
    if not 1 <= len(title) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    if any(not (" " <= ch <= "~") or ch == "\\" for ch in title):
        raise ValueError("an AE title holds printable ASCII only, and no backslash")
    return title


class InsecureExposureError(AppError):
    """The service would listen beyond loopback with no API keys and no explicit consent."""

    code = "insecure_exposure"


class Settings(BaseSettings):
    """Configuration of the service and the ``convirt`` commands.

    Every field can be set by ``CONVIRT_<FIELD>`` (``CONVIRT_API_KEYS`` is comma-separated)
    or by keyword. Derived defaults are filled in at construction, so after it every path
    field is absolute and ``database_url`` is set.
    """

    model_config = SettingsConfigDict(
        env_prefix="CONVIRT_",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        # Validation errors end up in logs: never echo a key or a database password.
        hide_input_in_errors=True,
    )

    data_dir: Path = Field(
        default=Path("data"),
        description="root of everything the service stores; relative paths are to the cwd",
    )
    database_url: str = Field(
        default="",
        repr=False,
        description="SQLAlchemy URL; empty means SQLite at {data_dir}/convirt.db",
    )
    bundle_dir: Path = Field(
        default=Path("data/bundle"), description="encoder bundle; unset: {data_dir}/bundle"
    )
    index_dir: Path = Field(
        default=Path("data/index"), description="vector index; unset: {data_dir}/index"
    )
    index_factory: str = Field(default="Flat", description="FAISS index factory string")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="accepted API keys (env: comma-separated); empty means no key checks",
    )
    allow_anonymous: bool = Field(
        default=False,
        description="consent to serve without API keys on a non-loopback address",
    )
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    max_upload_bytes: int = Field(default=50 * _MIB, gt=0, description="per request body")
    max_image_pixels: int = Field(
        default=8192 * 8192, gt=0, description="width × height above which a decode is refused"
    )
    max_aspect_ratio: float = Field(
        default=DEFAULT_MAX_ASPECT_RATIO,
        ge=1.0,
        description="longer side over shorter side above which an image is refused (422)",
    )
    min_image_side: int = Field(
        default=DEFAULT_MIN_SIDE,
        ge=1,
        description="shortest side, in pixels, below which an image is refused (422)",
    )
    max_query_chars: int = Field(default=1000, gt=0, description="longest text query")
    k_max: int = Field(default=1000, ge=1, description="most hits one search may ask for")
    classify_knn_k: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="stored labelled neighbours whose labels vote in /classify's second opinion",
    )
    encode_concurrency: int = Field(
        default=2, ge=1, le=64, description="model inferences running at the same time"
    )
    decode_pixel_budget: int = Field(
        default=24 * _MIB,
        gt=0,
        description="decoded pixels held at once across all requests (about 10 bytes each); "
        "an image above it is refused",
    )
    decode_wait_s: float = Field(
        default=10.0,
        ge=0.0,
        le=600.0,
        description="how long an image request waits for the pixel budget before 503 busy",
    )
    orphan_grace_s: float = Field(
        default=900.0,
        ge=0.0,
        description="age below which a stored file with no row is spared by the sweep",
    )
    orphan_sweep_interval_s: float = Field(
        default=3600.0, gt=0.0, description="seconds between orphan sweeps (also at start-up)"
    )
    feed_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        ge=0.0,
        description=(
            "age past which change-feed records are pruned, at each orphan sweep (0: never); "
            "a process down for longer rebuilds its index from the database"
        ),
    )
    store_originals: bool = Field(
        default=False,
        description="also keep the uploaded file (a DICOM may carry patient identifiers)",
    )
    thumbnail_size: int = Field(default=256, ge=16, le=2048, description="longest side, px")
    feed_poll_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=1.0,
        description="seconds between polls of the change feed (PostgreSQL also notifies)",
    )
    feed_max_lag_s: float = Field(
        default=30.0,
        gt=0,
        description="/ready answers 503 index_lagging when the index is this far behind",
    )
    evaluation_worker: bool = Field(
        default=True,
        description="run evaluation jobs in a thread of the serving process",
    )
    evaluation_lease_s: float = Field(
        default=30.0,
        ge=3.0,
        description="seconds an evaluation run's claim lasts unless its worker renews it",
    )
    log_level: LogLevel = "INFO"
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_HOSTS),
        description="host names the service answers to (Host header, any port; env: "
        "comma-separated; '*' allows any): a DNS-rebinding guard",
    )
    evaluation_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders POST /evaluations may read files under (env: comma-separated); "
        "empty means {data_dir}/evaluation",
    )
    log_paths: bool = Field(
        default=False,
        description="name input files in logs; off, a failing file is logged by its position "
        "and a short hash of its path (file names often carry patient names)",
    )
    max_connections: int = Field(
        default=256, ge=1, description="open connections `convirt serve` accepts at once"
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="seconds a request's headers may take to arrive (`convirt serve`)",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="seconds a request's body may take to arrive after its headers "
        "(`convirt serve`; 60 s is 0.9 MB/s for the default 50 MB upload limit)",
    )

    # -- PACS connectors (``convirt dicom-node``, ``convirt follow-dicomweb``) ---------------
    dicom_ae_title: str = Field(
        default="CONVIRT", description="the DICOM node's own AE title (1-16 characters)"
    )
    dicom_host: str = Field(
        default="127.0.0.1", min_length=1, description="address the DICOM node listens on"
    )
    dicom_port: int = Field(default=11112, ge=1, le=65535, description="DICOM node port")
    dicom_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="port of the DICOM node's Prometheus metrics (on dicom_host); unset: none",
    )
    dicom_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="calling AE titles the DICOM node accepts (env: comma-separated)",
    )
    dicom_accept_any_caller: bool = Field(
        default=False, description="accept associations from any calling AE title"
    )
    dicomweb_username: str = Field(default="", description="DICOMweb basic auth user")
    dicomweb_password: str = Field(default="", repr=False, description="DICOMweb basic auth")
    dicomweb_token: str = Field(
        default="", repr=False, description="DICOMweb bearer token (instead of basic auth)"
    )
    dicomweb_poll_seconds: float = Field(
        default=10.0, gt=0, le=3600, description="pause between polls of the DICOMweb server"
    )
    viewer_url_template: str = Field(
        default="",
        description="link to a study in the PACS viewer, with {study_instance_uid}; empty: none",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_defaults(cls, data: Any) -> Any:
        # Runs on the merged keyword + environment values (defaults are not in them yet), so
        # a CONVIRT_DATA_DIR moves the database, bundle and index with it unless those are
        # set themselves; an empty value counts as unset.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        raw_dir = data.get("data_dir") or Path("data")
        data_dir = Path(raw_dir).expanduser().absolute()
        data["data_dir"] = data_dir
        if not data.get("database_url"):
            data["database_url"] = f"sqlite:///{data_dir / 'convirt.db'}"
        for name, sub in (("bundle_dir", "bundle"), ("index_dir", "index")):
            value = data.get(name)
            data[name] = value if value else data_dir / sub
        if not data.get("evaluation_roots"):
            data["evaluation_roots"] = [data_dir / EVALUATION_DIR]
        return data

    @field_validator("data_dir", "bundle_dir", "index_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(
                "not a database URL; expected sqlite:///PATH or "
                "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
            ) from exc
        backend, _, driver = url.drivername.partition("+")
        if backend == "postgres":
            backend = "postgresql"
        if backend == "postgresql":
            if driver not in ("", "psycopg"):
                raise ValueError(
                    f"PostgreSQL driver {driver!r} is not installed; use postgresql+psycopg://"
                )
            url = url.set(drivername="postgresql+psycopg")
            if not url.database:
                raise ValueError("the PostgreSQL URL names no database")
        elif backend == "sqlite":
            if driver not in ("", "pysqlite"):
                raise ValueError(f"SQLite driver {driver!r} is not supported; use sqlite:///")
        else:
            raise ValueError(f"database {backend!r} is not supported: use SQLite or PostgreSQL")
        return url.render_as_string(hide_password=False)

    @field_validator("index_factory")
    @classmethod
    def _check_factory(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("the index factory string is empty (e.g. 'Flat', 'HNSW32')")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: list[str]) -> list[str]:
        for position, key in enumerate(value, start=1):
            # Keys are not echoed: the error message may end up in a log.
            if len(key) < MIN_API_KEY_CHARS:
                raise ValueError(
                    f"API key #{position} is shorter than {MIN_API_KEY_CHARS} characters"
                )
            if any(ch.isspace() for ch in key) or "," in key:
                raise ValueError(f"API key #{position} contains whitespace or a comma")
        return value

    @field_validator("dicom_ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_hosts", "evaluation_roots", "dicom_calling_aes", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        hosts = [host.strip().lower() for host in value if host.strip()]
        if not hosts:
            raise ValueError("allowed_hosts is empty: no request could be answered")
        return hosts

    @field_validator("evaluation_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        # Resolved once, so that the containment check compares real paths on both sides.
        return [Path(root).expanduser().resolve() for root in value]

    @field_validator("dicom_calling_aes")
    @classmethod
    def _check_calling_aes(cls, value: list[str]) -> list[str]:
        return [check_ae_title(title) for title in value]

    @field_validator("viewer_url_template")
    @classmethod
    def _check_viewer_template(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError("the viewer URL template must start with http:// or https://")
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(value)
            if name is not None
        ]
        # Only the bare field: no other names, no attribute access, no format spec (which
        # could also pad the URL to any length).
        if not fields or any(f != ("study_instance_uid", "", None) for f in fields):
            raise ValueError(
                "the viewer URL template may only use the field {study_instance_uid}, "
                "with no format spec"
            )
        return value

    @model_validator(mode="after")
    def _check_dicomweb_auth(self) -> Settings:
        if self.dicomweb_token and (self.dicomweb_username or self.dicomweb_password):
            raise ValueError("set either a DICOMweb bearer token or basic auth, not both")
        if bool(self.dicomweb_username) != bool(self.dicomweb_password):
            raise ValueError("DICOMweb basic auth needs both a user name and a password")
        return self

    def viewer_url(self, study_instance_uid: str | None) -> str | None:
        """The viewer link of a study, or None without a template or a UID."""
        if not self.viewer_url_template or not study_instance_uid:
            return None
        # Stored UIDs are digits and dots (PS3.5 9.1); quoting guards a row written otherwise.
        return self.viewer_url_template.format(
            study_instance_uid=quote(study_instance_uid, safe=".")
        )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def ensure_safe_exposure(self) -> None:
        """Refuse to serve beyond loopback with neither API keys nor explicit consent.

        Raises:
            InsecureExposureError: ``host`` is not loopback, ``api_keys`` is empty and
                ``allow_anonymous`` is false.
        """
        if self.is_loopback or self.api_keys or self.allow_anonymous:
            return
        raise InsecureExposureError(
            f"refusing to listen on {self.host} without API keys: set CONVIRT_API_KEYS, "
            "or CONVIRT_ALLOW_ANONYMOUS=true if anonymous access is intended"
        )
