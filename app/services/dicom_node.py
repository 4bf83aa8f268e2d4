"""A DICOM C-STORE SCP that feeds received chest radiographs into the ingest path.

What happens to one received instance (in the association's own thread):

1. the dataset's Modality must be CR or DX, else the instance is refused with status
   ``0xA900`` (the node stores chest radiographs only);
2. its bytes are decoded by the same step as an upload's
   (:meth:`app.services.ingest.IngestService.decode`), within the process's pixel budget
   (``CONVIRT_DECODE_PIXEL_BUDGET``, shared with uploads and image searches): the decoded
   pixels hold their share until the ingest thread has stored them, so a burst of large
   instances waits for earlier ones instead of filling memory, and one that finds no room
   within ``CONVIRT_DECODE_WAIT_S`` gets ``0xA700`` (out of resources: the sender retries
   later); an instance that the decoder refuses gets ``0xA900`` (colour, multi-frame,
   no pixel data, a side under ``CONVIRT_MIN_IMAGE_SIDE`` or a strip's shape: not what
   this node stores) or ``0xC000`` (cannot understand: corrupt, unsupported transfer
   syntax, too large);
3. the bytes are written to the staging directory under the data directory and fsynced
   (file and directory), and only then is success (``0x0000``) returned; a full disk
   gives ``0xA700`` (out of resources);
4. one ingest thread embeds the staged instances in batches and stores them like an
   upload (:meth:`~app.services.ingest.IngestService.persist`: files, then rows with their
   embeddings in one transaction, then the index), and removes each staged file after its
   commit.

So an acknowledged instance is on disk before the sender hears "success", and
:meth:`DicomNode.start` ingests whatever a crash left staged. Instances are deduplicated by
the sha256 of their encoded bytes, as uploads are, so a staged file ingested twice (a crash
between the commit and the removal) stays one image.

Every refusal is counted (:attr:`DicomNode.counts`) and logged with its reason, never with
a patient attribute; an exception in a handler is answered ``0xC000``, it never takes the
association down.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import Counter as PromCounter
from prometheus_client import start_http_server
from pydicom import Dataset

from app.errors import AppError
from app.services.budget import BusyError
from app.services.ingest import DecodedItem, IngestItem, IngestService
from app.services.pacs import clean_uid, is_radiograph_modality, study_uid_of
from model.errors import ModelError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

    from app.services.runtime import Runtime

logger = logging.getLogger(__name__)

#: C-STORE statuses (PS3.4 B.2.3).
STATUS_SUCCESS: Final = 0x0000
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_NOT_STORED_HERE: Final = 0xA900
STATUS_CANNOT_UNDERSTAND: Final = 0xC000

#: Decoder refusals that mean "a valid image, but not one this node stores".
_NOT_A_RADIOGRAPH_CODES: Final = frozenset(
    {
        "color_dicom",
        "multi_frame",
        "no_pixel_data",
        "image_too_small",
        "aspect_ratio_out_of_range",
    }
)

#: Directory below the data directory where received instances wait for their commit.
STAGING_DIRNAME: Final = "dicom-staging"
#: Largest PDU the node accepts (the peer splits an instance into PDUs of at most this).
MAX_PDU_BYTES: Final = 4 * 1024 * 1024
#: Seconds between index saves while instances arrive (always saved at the stop).
SAVE_INTERVAL_S: Final = 10.0
#: Suffix of a staged instance that could not be ingested at start-up (kept for a person).
FAILED_SUFFIX: Final = ".failed"


class NoCallerAcceptedError(AppError):
    """The node would accept no association (no calling AE title, no consent to any)."""

    code = "no_caller_accepted"


@dataclass(frozen=True)
class Refusal:
    """Why an instance was not stored: the C-STORE status and a counted reason."""

    status: int
    reason: str
    comment: str

    def as_status(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        # Error Comment is LO: at most 64 characters.
        ds.ErrorComment = self.comment[:64]
        return ds


@dataclass(frozen=True)
class _Staged:
    decoded: DecodedItem
    path: Path
    #: Pixels of the budget the decoded image holds until it is stored.
    pixels: int


#: fdatasync where the platform has it (Linux), fsync elsewhere.
_fdatasync = getattr(os, "fdatasync", os.fsync)


def _decoder_refusal(exc: ModelError) -> Refusal:
    """The status of an instance the decoder refuses: not stored here, or not understood."""
    status = (
        STATUS_NOT_STORED_HERE if exc.code in _NOT_A_RADIOGRAPH_CODES else STATUS_CANNOT_UNDERSTAND
    )
    return Refusal(status, exc.code, str(exc))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DicomNode:
    """The C-STORE SCP and its ingest thread, over a started :class:`Runtime`."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        batch_size: int = 16,
        queue_size: int = 64,
    ) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.ingest: IngestService = runtime.ingest
        self.staging = settings.data_dir / STAGING_DIRNAME
        self.batch_size = batch_size
        # Bounded: when embedding falls behind, handlers wait here (back-pressure on the
        # senders) instead of holding every decoded image in memory.
        self._queue: queue.Queue[_Staged | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._server: ThreadedAssociationServer | None = None
        self._metrics_server: WSGIServer | None = None
        # One node per runtime: the counter lives on the runtime's registry.
        self.instances = PromCounter(
            "convirt_dicom_instances",
            "C-STORE instances and associations of the DICOM node by outcome: stored, "
            "ingested, or the reason of a refusal.",
            ("outcome",),
            registry=runtime.metrics.registry,
        )
        self._worker: threading.Thread | None = None
        self._last_save = time.monotonic()

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Ingest staged leftovers, start the ingest thread and listen; returns the address."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        settings = self.runtime.settings
        if not settings.dicom_calling_aes and not settings.dicom_accept_any_caller:
            raise NoCallerAcceptedError(
                "no calling AE title is accepted: list some or accept any caller explicitly"
            )
        self.staging.mkdir(parents=True, exist_ok=True)
        self.recover()
        self._worker = threading.Thread(target=self._drain, name="dicom-ingest", daemon=True)
        self._worker.start()
        ae = AE(ae_title=settings.dicom_ae_title)
        # pynetdicom's default (16 KiB) splits a radiograph into hundreds of PDUs, each
        # parsed in Python; senders may use PDUs up to this size instead.
        ae.maximum_pdu_size = MAX_PDU_BYTES
        # Every storage SOP class is accepted so that a CT or MR instance is answered with a
        # C-STORE status saying why it is not stored, rather than a bare context rejection.
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        # An empty list is pynetdicom's "any caller": only explicit consent may give it.
        ae.require_calling_aet = (
            [] if settings.dicom_accept_any_caller else list(settings.dicom_calling_aes)
        )
        server = ae.start_server(
            (settings.dicom_host, settings.dicom_port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self.handle_store),
                (evt.EVT_REJECTED, self._log_rejected),
            ],
        )
        assert server is not None  # non-blocking start_server returns the server
        self._server = server
        host, port = server.server_address[:2]
        if settings.dicom_metrics_port is not None:
            self._metrics_server, _ = start_http_server(
                settings.dicom_metrics_port,
                addr=settings.dicom_host,
                registry=self.runtime.metrics.registry,
            )
        logger.info("DICOM node %s listening on %s:%d", settings.dicom_ae_title, host, port)
        return str(host), int(port)

    def stop(self) -> None:
        """Stop listening, ingest everything acknowledged, stop the ingest thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        self.runtime.index.save_if_dirty()
        logger.info("DICOM node stopped: %s", dict(self.counts) or "nothing received")

    def recover(self) -> int:
        """Ingest the instances a previous run acknowledged but did not commit."""
        leftovers = sorted(p for p in self.staging.glob("*.dcm") if p.is_file())
        for path in leftovers:
            data = path.read_bytes()
            item = IngestItem(data=data, study_instance_uid=study_uid_of(data))
            result = self.ingest.ingest([item])[0]
            if result.status == "failed":
                # Acknowledged once, so never deleted: set aside for a person to look at.
                logger.error("staged %s cannot be ingested: %s", path.name, result.error)
                path.rename(path.with_name(path.name + FAILED_SUFFIX))
                self._count("recovery_failed")
                continue
            path.unlink()
            self._count("recovered")
        if leftovers:
            logger.info("%d staged instances from an earlier run ingested", len(leftovers))
            self.runtime.index.save_if_dirty()
        return len(leftovers)

    # -- the C-STORE handler -----------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self._count_many(outcome, 1)

    def _refuse(self, refusal: Refusal) -> Dataset:
        self._count(refusal.reason)
        self.ingest.metrics.ingested.labels("failed").inc()
        logger.info(
            "C-STORE refused (0x%04X %s): %s", refusal.status, refusal.reason, refusal.comment
        )
        return refusal.as_status()

    def handle_store(self, event: Event) -> int | Dataset:
        """Answer one C-STORE request; never raises."""
        try:
            refusal = self._receive(event)
        except Exception:  # a handler must answer: an escaping error would abort the peer
            logger.exception("C-STORE handler failed")
            refusal = Refusal(STATUS_CANNOT_UNDERSTAND, "internal_error", "internal error")
        if refusal is not None:
            return self._refuse(refusal)
        self._count("stored")
        return STATUS_SUCCESS

    def _receive(self, event: Event) -> Refusal | None:
        try:
            ds = event.dataset
            modality = ds.get("Modality")
        except Exception as exc:  # pydicom raises many unrelated types on malformed input
            logger.info("unreadable C-STORE dataset: %s", type(exc).__name__)
            return Refusal(STATUS_CANNOT_UNDERSTAND, "corrupt_dicom", "unreadable data set")
        if not is_radiograph_modality(modality):
            # The value is a code string from the sender: shown clipped, never trusted.
            shown = str(modality or "missing")[:16]
            return Refusal(
                STATUS_NOT_STORED_HERE,
                "not_a_radiograph",
                f"modality {shown!r}: only CR and DX are stored",
            )
        data = event.encoded_dataset(include_meta=True)
        item = IngestItem(data=data, study_instance_uid=clean_uid(ds.get("StudyInstanceUID")))
        budget = self.ingest.budget
        try:
            cost = self.ingest.pixel_cost(data)
            self.ingest.check_cost(cost)
            held = budget.acquire(cost)
        except ModelError as exc:
            return _decoder_refusal(exc)
        except BusyError:
            return Refusal(STATUS_OUT_OF_RESOURCES, "busy", "decoding other images: retry later")
        queued = False
        try:
            decoded = self.ingest.decode(item)
            path = self._stage(decoded.content_hash, data)
            self._queue.put(_Staged(decoded, path, held))
            queued = True
        except ModelError as exc:
            return _decoder_refusal(exc)
        except OSError as exc:
            logger.error("cannot stage a received instance: %s", exc.strerror)
            return Refusal(STATUS_OUT_OF_RESOURCES, "staging_failed", "cannot store: disk")
        finally:
            # Once queued, the ingest thread gives the pixels back after storing them.
            if not queued:
                budget.release(held)
        return None

    def _stage(self, digest: str, data: bytes) -> Path:
        """Write ``data`` durably to the staging directory, named by its hash."""
        final = self.staging / f"{digest}.dcm"
        partial = self.staging / f".{digest}.{threading.get_ident()}.partial"
        with partial.open("wb") as handle:
            handle.write(data)
            handle.flush()
            # Data (and the size) only: the rename and the directory fsync do the rest.
            _fdatasync(handle.fileno())
        partial.replace(final)
        _fsync_dir(self.staging)
        return final

    def _log_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        logger.warning(
            "association from %s (calling AE %r) rejected",
            requestor.address,
            requestor.ae_title,
        )
        self._count("association_rejected")

    # -- the ingest thread -------------------------------------------------------------

    def _drain(self) -> None:
        done = False
        while not done:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    done = True
                    break
                batch.append(nxt)
            self._commit(batch)

    def _commit(self, batch: Sequence[_Staged]) -> None:
        try:
            self._store(batch)
        finally:
            # Stored or left staged, the decoded pixels are dropped now.
            self.ingest.budget.release(sum(staged.pixels for staged in batch))

    def _store(self, batch: Sequence[_Staged]) -> None:
        try:
            known = self.ingest.find_existing([s.decoded.content_hash for s in batch])
            fresh: dict[str, DecodedItem] = {}
            for staged in batch:
                digest = staged.decoded.content_hash
                if digest not in known:
                    fresh.setdefault(digest, staged.decoded)
            todo = list(fresh.values())
            self.ingest.persist(todo, self.ingest.encode(todo))
        except Exception:
            # Left staged: the next start ingests them. The sender already has its success.
            logger.exception("ingest of %d received instances failed; kept staged", len(batch))
            self._count("ingest_deferred")
            return
        for staged in batch:
            staged.path.unlink(missing_ok=True)
        self._count_many("ingested", len(batch))
        if time.monotonic() - self._last_save >= SAVE_INTERVAL_S:
            self.runtime.index.save_if_dirty()
            self._last_save = time.monotonic()

    def _count_many(self, outcome: str, n: int) -> None:
        with self._lock:
            self.counts[outcome] += n
        # Outcomes are this module's reasons and the decoder's error codes: a fixed set.
        self.instances.labels(outcome).inc(n)
