"""Follow a DICOMweb server: find new chest radiographs, fetch them, ingest them.

Two ways to learn what is new, both ending in a WADO-RS fetch of each instance and the
same ingest path as an upload (:meth:`app.services.ingest.IngestService.ingest`):

- **Orthanc** (the server's REST root answers ``/system`` as Orthanc does): its ``/changes``
  feed lists every new instance with an increasing sequence number. The cursor is that
  number, stored in ``dicomweb_cursors`` and advanced right after each batch's commit, so a
  restart resumes after the last committed batch. An instance deleted before it is
  fetched answers 404 and is skipped, and the cursor never goes back, so a study deleted on
  the PACS is not brought back.
- **QIDO-RS** (any other server): series of Modality CR and DX are searched; a series is
  fetched when it is new or holds more instances than when it was last fetched, and is
  recorded in ``dicomweb_series`` once its instances are committed. A deleted series no
  longer shows up in the search, so it is not fetched again.

A crash between a batch's commit and its cursor update re-fetches at most that batch; the
instances dedupe by content hash, so nothing is stored twice. Instances are re-encoded
from what WADO-RS returns, deterministically, so the same instance fetched twice has the
same bytes and the same hash.

Credentials come from the settings (basic or bearer), never from the URL; nothing about a
patient is logged.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit

import pydicom
import requests
from sqlalchemy import select

from app.errors import AppError
from app.models import DicomwebCursor, DicomwebSeries
from app.services.ingest import IngestItem
from app.services.pacs import RADIOGRAPH_MODALITIES, clean_uid, is_radiograph_modality

if TYPE_CHECKING:
    from dicomweb_client.api import DICOMwebClient

    from app.services.runtime import Runtime
    from app.settings import Settings

logger = logging.getLogger(__name__)

Mode = Literal["auto", "orthanc", "qido"]

#: Changes asked of Orthanc per request.
CHANGES_PAGE: Final = 100
#: Series asked of a QIDO-RS search per request.
QIDO_PAGE: Final = 100
#: Seconds between index saves while following (always saved when a pass ends).
SAVE_INTERVAL_S: Final = 10.0
HTTP_TIMEOUT_S: Final = 60.0

# DICOM JSON attribute tags (PS3.18 F.2) read off QIDO-RS results.
_STUDY_UID: Final = "0020000D"
_SERIES_UID: Final = "0020000E"
_SOP_UID: Final = "00080018"
_SERIES_INSTANCES: Final = "00201209"


class DicomwebSourceError(AppError):
    """The DICOMweb URL or its server cannot be followed."""

    code = "dicomweb_source"


@dataclass(frozen=True)
class InstanceRef:
    """Where an instance is on the server (its UIDs, checked)."""

    study: str
    series: str
    sop: str


def source_key(url: str) -> str:
    """The URL the cursor is kept under: scheme, host, port and path; no trailing slash.

    Raises:
        DicomwebSourceError: not an http(s) URL, or it carries credentials.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DicomwebSourceError(f"not an http(s) URL: {url!r}")
    if parts.username or parts.password:
        raise DicomwebSourceError(
            "the URL carries credentials: set CONVIRT_DICOMWEB_USERNAME/PASSWORD or "
            "CONVIRT_DICOMWEB_TOKEN instead"
        )
    if parts.query or parts.fragment:
        raise DicomwebSourceError("the DICOMweb URL takes no query or fragment")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def http_session(settings: Settings) -> requests.Session:
    """A requests session carrying the DICOMweb credentials of the settings, if any."""
    session = requests.Session()
    if settings.dicomweb_token:
        session.headers["Authorization"] = f"Bearer {settings.dicomweb_token}"
    elif settings.dicomweb_username:
        session.auth = (settings.dicomweb_username, settings.dicomweb_password)
    return session


def _json_value(record: dict[str, Any], tag: str) -> Any:
    values = record.get(tag, {}).get("Value") or [None]
    return values[0]


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related`` message (RFC 2046), in order.

    A body that is not multipart (a server answering ``application/dicom`` outright) is
    returned as the only part.
    """
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        return [body] if body else []
    boundary = next(
        (
            value.strip().strip('"')
            for key, _, value in (p.partition("=") for p in params.split(";"))
            if key.strip().lower() == "boundary"
        ),
        "",
    )
    if not boundary:
        return []
    delimiter = b"--" + boundary.encode("ascii", "replace")
    parts = []
    # Each part sits between "--boundary" and "\r\n--boundary"; the last delimiter ends "--".
    for chunk in body.split(b"\r\n" + delimiter)[:-1] if body.startswith(delimiter) else []:
        chunk = chunk.removeprefix(delimiter)
        _, found, content = chunk.partition(b"\r\n\r\n")
        if found:
            parts.append(content)
    return parts


def as_part10(data: bytes) -> bytes:
    """``data`` as a DICOM file with its preamble and ``DICM`` prefix (PS3.10).

    A file that has them is returned as is (its hash is then the file's own); one without
    them (a bare file meta group or dataset) is rewritten, deterministically, so that the
    decoder, which checks the ``DICM`` magic, reads it and a re-fetch hashes the same.
    """
    if data[128:132] == b"DICM":
        return data
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception:  # pydicom raises many unrelated types on malformed input
        # Left to the decoder, which refuses it with a stable code like any bad upload.
        return data
    return buffer.getvalue()


class DicomwebFollower:
    """Follows one DICOMweb server into the runtime's database and index."""

    def __init__(
        self,
        runtime: Runtime,
        url: str,
        *,
        mode: Mode = "auto",
        batch_size: int = 8,
        session: requests.Session | None = None,
    ) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.runtime = runtime
        self.source = source_key(url)
        self.batch_size = batch_size
        self.session = session or http_session(runtime.settings)
        self.client: DICOMwebClient = DICOMwebClient(
            self.source, session=self.session, timeout=HTTP_TIMEOUT_S
        )
        self.mode = mode
        self._orthanc: str | None = None
        self._decided = False
        self.counts: Counter[str] = Counter()
        self._last_save = time.monotonic()

    # -- discovery ---------------------------------------------------------------------

    def orthanc_root(self) -> str | None:
        """Orthanc's REST root when the server is an Orthanc (and the mode allows), else None.

        Decided once, at the first answer: a follower never switches between the change
        feed and QIDO-RS (whose first pass would re-fetch everything the other fetched).

        Raises:
            requests.RequestException: the server cannot be reached, or refuses the
                credentials; nothing is decided then.
            DicomwebSourceError: ``mode`` is ``orthanc`` and the server is not one.
        """
        if self.mode == "qido":
            return None
        if self._decided:
            return self._orthanc
        # Orthanc's DICOMweb plugin lives under {root}/dicom-web by default.
        root = self.source.rsplit("/", 1)[0] if self.source.endswith("/dicom-web") else None
        about: Any = {}
        if root is not None:
            response = self.session.get(f"{root}/system", timeout=HTTP_TIMEOUT_S)
            if response.status_code in (401, 403):
                response.raise_for_status()
            try:
                about = response.json() if response.ok else {}
            except ValueError:  # not JSON: not an Orthanc
                about = {}
        if isinstance(about, dict) and "ApiVersion" in about and "DicomAet" in about:
            logger.info("following Orthanc %s by its change feed", about.get("Version"))
            self._orthanc = root
        elif self.mode == "orthanc":
            raise DicomwebSourceError(f"{self.source} is not an Orthanc's /dicom-web root")
        else:
            logger.info("following %s by QIDO-RS searches", self.source)
        self._decided = True
        return self._orthanc

    # -- one pass ----------------------------------------------------------------------

    def poll_once(self, stop: threading.Event | None = None) -> int:
        """Fetch and ingest everything new; returns the instances fetched.

        Raises:
            requests.RequestException: the server failed; the cursor is where the last
                committed batch left it.
        """
        root = self.orthanc_root()
        fetched = self._poll_orthanc(root, stop) if root else self._poll_qido(stop)
        self.runtime.index.save_if_dirty()
        self._last_save = time.monotonic()
        return fetched

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; a failing server is retried at the next poll."""
        pause = self.runtime.settings.dicomweb_poll_seconds
        while not stop.is_set():
            try:
                fetched = self.poll_once(stop)
                if fetched:
                    logger.info("%d instances fetched; totals %s", fetched, dict(self.counts))
            except (requests.RequestException, ValueError) as exc:
                # ValueError: an answer that is not the JSON it should be.
                logger.warning("DICOMweb server unavailable (%s); retrying", type(exc).__name__)
            stop.wait(pause)

    # -- Orthanc's change feed ---------------------------------------------------------

    def _poll_orthanc(self, root: str, stop: threading.Event | None) -> int:
        fetched = 0
        cursor = self.cursor()
        while stop is None or not stop.is_set():
            response = self.session.get(
                f"{root}/changes",
                params={"since": cursor, "limit": CHANGES_PAGE},
                timeout=HTTP_TIMEOUT_S,
            )
            response.raise_for_status()
            page = response.json()
            pending: list[IngestItem] = []
            # The last change handled: the cursor may move to it once `pending` is committed.
            handled = cursor
            for change in page.get("Changes", []):
                if stop is not None and stop.is_set():
                    break
                if change.get("ChangeType") == "NewInstance":
                    item = self._fetch_orthanc_instance(root, str(change["ID"]))
                    if item is not None:
                        pending.append(item)
                        fetched += 1
                handled = int(change["Seq"])
                if len(pending) >= self.batch_size:
                    self._ingest(pending)
                    pending = []
                    cursor = self._save_cursor(handled)
            else:
                # The whole page was handled, including the changes that are not listed.
                handled = max(handled, int(page.get("Last", handled)))
            self._ingest(pending)
            cursor = self._save_cursor(handled)
            if page.get("Done", True):
                break
        return fetched

    def _fetch_orthanc_instance(self, root: str, orthanc_id: str) -> IngestItem | None:
        response = self.session.get(
            f"{root}/instances/{orthanc_id}/simplified-tags", timeout=HTTP_TIMEOUT_S
        )
        if response.status_code == 404:
            self.counts["deleted_on_server"] += 1
            return None
        response.raise_for_status()
        tags = response.json()
        if not is_radiograph_modality(tags.get("Modality")):
            self.counts["not_a_radiograph"] += 1
            return None
        ref = self._ref(
            tags.get("StudyInstanceUID"), tags.get("SeriesInstanceUID"), tags.get("SOPInstanceUID")
        )
        return None if ref is None else self._fetch(ref)

    def cursor(self) -> int:
        """The last Orthanc change handled for this source (0: none yet)."""
        with self.runtime.sessions() as session:
            row = session.get(DicomwebCursor, self.source)
            return int(row.last_change) if row is not None else 0

    def _save_cursor(self, seq: int) -> int:
        with self.runtime.sessions() as session, session.begin():
            row = session.get(DicomwebCursor, self.source)
            if row is None:
                session.add(DicomwebCursor(source=self.source, last_change=seq))
            elif seq > row.last_change:
                row.last_change = seq
        return seq

    # -- QIDO-RS -----------------------------------------------------------------------

    def _poll_qido(self, stop: threading.Event | None) -> int:
        fetched = 0
        known = self._known_series()
        for study, series, count in self._radiograph_series():
            if stop is not None and stop.is_set():
                break
            if known.get(series, -1) >= count:
                continue
            fetched += self._fetch_series(study, series)
        return fetched

    def _radiograph_series(self) -> Iterator[tuple[str, str, int]]:
        for modality in sorted(RADIOGRAPH_MODALITIES):
            offset = 0
            while True:
                page = self.client.search_for_series(
                    search_filters={"Modality": modality},
                    fields=["NumberOfSeriesRelatedInstances"],
                    offset=offset,
                    limit=QIDO_PAGE,
                )
                for record in page:
                    study = clean_uid(_json_value(record, _STUDY_UID))
                    series = clean_uid(_json_value(record, _SERIES_UID))
                    if study and series:
                        count = _json_value(record, _SERIES_INSTANCES)
                        # Unknown count: fetched once, when first seen.
                        yield study, series, int(count) if count is not None else 0
                if len(page) < QIDO_PAGE:
                    break
                offset += len(page)

    def _fetch_series(self, study: str, series: str) -> int:
        records = self.client.search_for_instances(
            study_instance_uid=study, series_instance_uid=series
        )
        refs = [
            ref
            for record in records
            if (ref := self._ref(study, series, _json_value(record, _SOP_UID))) is not None
        ]
        pending: list[IngestItem] = []
        fetched = 0
        for ref in refs:
            item = self._fetch(ref)
            if item is not None:
                pending.append(item)
                fetched += 1
            if len(pending) >= self.batch_size:
                self._ingest(pending)
                pending = []
        self._ingest(pending)
        with self.runtime.sessions() as session, session.begin():
            row = session.get(DicomwebSeries, (self.source, series))
            if row is None:
                session.add(
                    DicomwebSeries(
                        source=self.source, series_instance_uid=series, instances=len(refs)
                    )
                )
            else:
                row.instances = len(refs)
        return fetched

    def _known_series(self) -> dict[str, int]:
        with self.runtime.sessions() as session:
            rows = session.execute(
                select(DicomwebSeries.series_instance_uid, DicomwebSeries.instances).where(
                    DicomwebSeries.source == self.source
                )
            ).all()
        return {str(uid): int(n) for uid, n in rows}

    # -- fetch and ingest --------------------------------------------------------------

    def _ref(self, study: object, series: object, sop: object) -> InstanceRef | None:
        uids = (clean_uid(study), clean_uid(series), clean_uid(sop))
        if None in uids:
            self.counts["malformed_uid"] += 1
            return None
        return InstanceRef(*uids)  # type: ignore[arg-type]

    def _fetch(self, ref: InstanceRef) -> IngestItem | None:
        """WADO-RS retrieve one instance; None when the server no longer has it."""
        url = f"{self.source}/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}"
        # Fetched and split here rather than by retrieve_instance(), which parses each part
        # strictly and refuses files stored without the 128-byte preamble (as STOW-RS
        # clients often send them); the raw bytes are also what gets hashed.
        response = self.session.get(
            url,
            headers={"Accept": 'multipart/related; type="application/dicom"'},
            timeout=HTTP_TIMEOUT_S,
        )
        if response.status_code in (404, 410):
            self.counts["deleted_on_server"] += 1
            return None
        response.raise_for_status()
        parts = multipart_parts(response.headers.get("Content-Type", ""), response.content)
        if len(parts) != 1:
            self.counts["malformed_response"] += 1
            logger.warning("WADO-RS answered %d parts for one instance", len(parts))
            return None
        self.counts["fetched"] += 1
        return IngestItem(data=as_part10(parts[0]), study_instance_uid=ref.study)

    def _ingest(self, items: Sequence[IngestItem]) -> None:
        if not items:
            return
        for result in self.runtime.ingest.ingest(items):
            self.counts[result.status] += 1
            if result.error is not None:
                logger.warning("a fetched instance was not ingested: %s", result.error.code)
        if time.monotonic() - self._last_save >= SAVE_INTERVAL_S:
            self.runtime.index.save_if_dirty()
            self._last_save = time.monotonic()
