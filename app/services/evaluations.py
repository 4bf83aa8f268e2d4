"""Background evaluation runs of the service (``/evaluations``).

A run scores the service's encoder bundle with :mod:`model.evaluation` over one of:

- ``chexpert-8x200``: the official protocol files and a CheXpert root readable by the
  server;
- ``manifest``: a labelled manifest readable by the server, sampled per category;
- ``stored``: the images already stored in the service, with their labels, sampled the
  same way (their de-identified PNGs are what is embedded);
- ``zero-shot`` and ``linear-probe``: the classification protocols over a labelled
  manifest (or CheXpert CSV) readable by the server, run by the same code as ``convirt
  evaluate`` (:mod:`model.evaluation.classification`), so both give the same numbers.

One run at a time across every process: :meth:`EvaluationJobs.submit` validates the
request synchronously (so a missing image or an absent category is a 422 problem at
once) and stores a ``queued`` ``evaluation_runs`` row; a submission while another run is
queued or running raises :class:`EvaluationBusyError` (409). A worker — a thread of the
serving process by default, or ``convirt worker`` processes — claims it from the job
queue (:mod:`app.services.jobs`: leases, retry once, never two running at once), records
progress, then the results (``report.json``'s document) or the error, and writes the
report files under ``{data_dir}/evaluations/{id}/``. Image vectors are cached in the
``embedding_cache`` table by (model id, content hash), so a repeated run over the same
images is quick.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.errors import ProblemError
from app.models import CachedEmbedding, EvaluationRun, Image, utcnow
from app.services.evaluation_inputs import confine, confine_images, confine_protocol_dir
from app.services.jobs import LEASE_S, JobQueue
from app.services.runtime import Runtime
from model.errors import ModelError
from model.evaluation.assemble import OFFICIAL, assemble_protocol
from model.evaluation.baseline import InitialBackbone, has_backbone_baseline
from model.evaluation.classification import (
    CLASSIFICATION_PROTOCOLS,
    ClassificationRequest,
    PreparedClassification,
    prepare_classification,
    run_classification,
)
from model.evaluation.protocol import RetrievalProtocol, TextQuery
from model.evaluation.runner import (
    EvaluationCancelled,
    EvaluationOptions,
    ProgressCallback,
    run_evaluation,
)
from model.evaluation.sampling import LabelledImage, manifest_images

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

PROTOCOLS: Final[tuple[str, ...]] = (
    "chexpert-8x200",
    "manifest",
    "stored",
    *CLASSIFICATION_PROTOCOLS,
)
#: Sub-folder of the data directory holding each run's report files.
REPORTS_DIR: Final = "evaluations"
#: Seconds between progress writes to the database.
PROGRESS_INTERVAL_S: Final = 0.5
# Rows per IN (...) query of the cache.
_CHUNK: Final = 500

#: A prepared run: ``work(progress, cancel, report_dir)`` scores, writes the report files
#: and returns ``report.json``'s document.
Work = Callable[[ProgressCallback, threading.Event, Path], dict[str, Any]]


class EvaluationBusyError(ProblemError):
    """Another evaluation is running in this service: a 409 problem."""

    def __init__(self, run_id: int) -> None:
        super().__init__(
            409,
            "evaluation_running",
            f"evaluation {run_id} is still running; one evaluation runs at a time",
        )
        self.run_id = run_id


@dataclass(frozen=True)
class EvaluationRequest:
    """What to evaluate; ``protocol`` decides which fields apply.

    ``root``/``protocol_dir``: chexpert-8x200. ``manifest``: manifest. ``categories``,
    ``candidates_per_category``, ``queries_per_category``, ``seed`` and ``text_queries``
    (category, text) pairs: manifest and stored (built-in queries when empty).
    ``prompt_set``, ``knn_k``, ``bootstrap`` (zero-shot), ``fractions``, ``draws``,
    ``task`` (linear-probe), with ``manifest``, ``root`` (images of a CheXpert CSV),
    ``categories`` (the findings), ``seed`` and ``backbone`` (the probe's baselines):
    the classification protocols.
    """

    protocol: str
    root: str | None = None
    protocol_dir: str | None = None
    manifest: str | None = None
    categories: tuple[str, ...] | None = None
    candidates_per_category: int = 200
    queries_per_category: int = 10
    text_queries: tuple[tuple[str, str], ...] = ()
    seed: int = 0
    ks: tuple[int, ...] = (5, 10, 50)
    backbone: bool = True
    random_repeats: int = 20
    prompt_set: str | None = None
    knn_k: int = ClassificationRequest.knn_k
    bootstrap: int = ClassificationRequest.bootstrap
    fractions: tuple[float, ...] = ClassificationRequest.fractions
    draws: int = ClassificationRequest.draws
    task: str = ClassificationRequest.task

    def classification(self) -> ClassificationRequest:
        """The zero-shot or linear-probe request, as ``convirt evaluate`` builds it."""
        return ClassificationRequest(
            protocol=self.protocol,
            manifest=self.manifest or "",
            root=self.root,
            findings=self.categories,
            prompt_set=self.prompt_set,
            knn_k=self.knn_k,
            bootstrap=self.bootstrap,
            fractions=self.fractions,
            draws=self.draws,
            task=self.task,
            baselines=self.backbone,
            seed=self.seed,
        )

    @classmethod
    def from_run(cls, protocol: str, params: Mapping[str, Any]) -> EvaluationRequest:
        """The request a stored run was made with (the inverse of :meth:`params`)."""
        if protocol in CLASSIFICATION_PROTOCOLS:
            return cls._classification_from_run(protocol, params)
        queries = params.get("text_queries")
        categories = params.get("categories")
        defaults = cls(protocol=protocol)
        return cls(
            protocol=protocol,
            root=params.get("root"),
            protocol_dir=params.get("protocol_dir"),
            manifest=params.get("manifest"),
            categories=tuple(categories) if categories else None,
            candidates_per_category=int(
                params.get("candidates_per_category", defaults.candidates_per_category)
            ),
            queries_per_category=int(
                params.get("queries_per_category", defaults.queries_per_category)
            ),
            text_queries=tuple((str(c), str(t)) for c, t in queries)
            if isinstance(queries, list)
            else (),
            seed=int(params.get("seed", defaults.seed)),
            ks=tuple(int(k) for k in params.get("ks", defaults.ks)),
            backbone=bool(params.get("backbone", defaults.backbone)),
            random_repeats=int(params.get("random_repeats", defaults.random_repeats)),
        )

    @classmethod
    def _classification_from_run(
        cls, protocol: str, params: Mapping[str, Any]
    ) -> EvaluationRequest:
        """A zero-shot or linear-probe request from what :meth:`params` recorded."""
        defaults = cls(protocol=protocol)
        findings = params.get("findings")
        fractions = params.get("fractions")
        return cls(
            protocol=protocol,
            manifest=params.get("manifest"),
            root=params.get("root"),
            categories=tuple(findings) if findings else None,
            seed=int(params.get("seed", defaults.seed)),
            prompt_set=params.get("prompt_set"),
            knn_k=int(params.get("knn_k", defaults.knn_k)),
            bootstrap=int(params.get("bootstrap", defaults.bootstrap)),
            fractions=tuple(float(f) for f in fractions) if fractions else defaults.fractions,
            draws=int(params.get("draws", defaults.draws)),
            task=str(params.get("task", defaults.task)),
            backbone=bool(params.get("baselines", defaults.backbone)),
        )

    def params(self) -> dict[str, Any]:
        """The request as stored with the run (JSON)."""
        if self.protocol in CLASSIFICATION_PROTOCOLS:
            return self.classification().params()
        out: dict[str, Any] = {
            "ks": list(self.ks),
            "backbone": self.backbone,
            "random_repeats": self.random_repeats,
            "seed": self.seed,
        }
        if self.protocol == "chexpert-8x200":
            out.update(root=self.root, protocol_dir=self.protocol_dir)
        else:
            out.update(
                categories=list(self.categories) if self.categories else None,
                candidates_per_category=self.candidates_per_category,
                queries_per_category=self.queries_per_category,
                text_queries=[list(q) for q in self.text_queries] or "built-in",
            )
            if self.protocol == "manifest":
                out["manifest"] = self.manifest
        return out


class DatabaseEmbeddingCache:
    """:class:`model.evaluation.cache.EmbeddingCache` on the ``embedding_cache`` table."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def get_many(self, model_id: str, content_hashes: Sequence[str]) -> dict[str, FloatArray]:
        wanted = list(dict.fromkeys(content_hashes))
        found: dict[str, FloatArray] = {}
        with self.sessions() as session:
            for start in range(0, len(wanted), _CHUNK):
                rows = session.scalars(
                    select(CachedEmbedding).where(
                        CachedEmbedding.model_id == model_id,
                        CachedEmbedding.content_hash.in_(wanted[start : start + _CHUNK]),
                    )
                )
                for row in rows:
                    found[row.content_hash] = row.as_array()  # (dim,)
        return found

    def put_many(self, model_id: str, vectors: Mapping[str, FloatArray]) -> None:
        with self.sessions() as session, session.begin():
            for key, vector in vectors.items():
                # merge: an entry written by an earlier, interrupted run is replaced.
                session.merge(CachedEmbedding.from_vector(model_id, key, vector))


@dataclass
class _Job:
    run_id: int
    cancel: threading.Event = field(default_factory=threading.Event)


class EvaluationJobs:
    """Submission and execution of evaluation runs (``app.state.evaluations``).

    Submitting needs no worker; :meth:`execute` is what a worker calls for a run it
    claimed (:class:`app.services.job_worker.JobWorker`).
    """

    def __init__(self, *, lease_s: float = LEASE_S) -> None:
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._sessions: sessionmaker[Session] | None = None
        #: Set on submission: a worker thread of this process looks at the queue at once.
        self.submitted = threading.Event()

    # -- queries -------------------------------------------------------------------------

    def running_id(self) -> int | None:
        """Id of the run this process is executing, if any."""
        with self._lock:
            return self._job.run_id if self._job is not None else None

    def queue(self, sessions: sessionmaker[Session]) -> JobQueue:
        self._sessions = sessions
        return JobQueue(sessions, lease_s=self.lease_s)

    def recover(self, sessions: sessionmaker[Session]) -> None:
        """Settle runs whose worker stopped (lease passed): queued again once, or failed."""
        self.queue(sessions).reap_now()

    # -- submission ----------------------------------------------------------------------

    def submit(self, runtime: Runtime, request: EvaluationRequest) -> EvaluationRun:
        """Validate and store a queued run; returns the stored row.

        Raises :class:`EvaluationBusyError` while another run is queued or running (in
        any process) and a :class:`model.errors.ModelError` (``image_missing``,
        ``category_absent``, ``not_enough_images``…) for a request that cannot be evaluated.
        """
        queue = self.queue(runtime.sessions)
        queue.reap_now()
        busy = queue.active_run()
        if busy is not None:
            raise EvaluationBusyError(busy)
        # Checked now (a 4xx rather than a failed run later); the worker prepares it again.
        self._prepare(runtime, request)
        with runtime.sessions() as session, session.begin():
            run = EvaluationRun(
                model_id=runtime.bundle.model_id,
                protocol=request.protocol,
                params=request.params(),
                status="queued",
                progress=0.0,
            )
            session.add(run)
            session.flush()
            session.expunge(run)
        logger.info("evaluation %d queued (%s)", run.id, request.protocol)
        self.submitted.set()
        return run

    def cancel(self, timeout: float | None = None) -> None:
        """Ask the run this process executes to stop; wait up to ``timeout`` seconds."""
        with self._lock:
            job = self._job
        if job is not None:
            job.cancel.set()
        self.wait_local(timeout)

    def wait_local(self, timeout: float | None = None) -> bool:
        """Wait until this process executes no run; True when it does not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running_id() is not None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no run is queued or running anywhere; True when none is afterwards."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sessions = self._sessions
            idle = self.running_id() is None and (
                sessions is None or self.queue(sessions).active_run() is None
            )
            if idle:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    # -- execution -----------------------------------------------------------------------

    def execute(self, runtime: Runtime, run_id: int, cancel: threading.Event) -> None:
        """Run a claimed run to its end: results, or the error, are stored with it."""
        with self._lock:
            self._job = _Job(run_id, cancel)
        try:
            with runtime.sessions() as session:
                run = session.get(EvaluationRun, run_id)
                if run is None:
                    return
                request = EvaluationRequest.from_run(run.protocol, run.params or {})
            try:
                work = self._prepare(runtime, request)
            except (ModelError, ProblemError) as exc:
                # Valid when submitted, no longer (files moved, images deleted).
                self._finish_failed(runtime.sessions, run_id, f"{exc.code}: {exc}")
                return
            self._work(runtime, run_id, work, cancel)
        finally:
            with self._lock:
                self._job = None

    def _prepare(self, runtime: Runtime, request: EvaluationRequest) -> Work:
        """Check the request (a 4xx problem now rather than a failed run later); its work."""
        sessions = runtime.sessions
        if request.protocol in CLASSIFICATION_PROTOCOLS:
            if not request.manifest:
                raise ProblemError(422, "invalid_request", f"{request.protocol} needs a manifest")
            prepared = self._confined_classification(runtime, request)

            def classify(progress: ProgressCallback, cancel: threading.Event, out: Path) -> Any:
                outcome = run_classification(
                    prepared,
                    runtime.bundle,
                    cache=DatabaseEmbeddingCache(sessions),
                    progress=progress,
                    cancel=cancel,
                )
                outcome.write(out, None)
                return outcome.document

            return classify
        protocol, root = self._protocol(runtime, request)
        options = EvaluationOptions(
            ks=request.ks, random_repeats=request.random_repeats, seed=request.seed
        )

        def retrieve(progress: ProgressCallback, cancel: threading.Event, out: Path) -> Any:
            from model.evaluation.report_files import write_report

            # An imported model is one network: there is no untrained backbone of its own.
            wanted = request.backbone and has_backbone_baseline(runtime.bundle)
            backbone = InitialBackbone.from_bundle(runtime.bundle) if wanted else None
            result = run_evaluation(
                protocol,
                runtime.bundle,
                root=root,
                backbone=backbone,
                cache=DatabaseEmbeddingCache(sessions),
                options=options,
                progress=progress,
                cancel=cancel,
                model_name=runtime.bundle.name,
            )
            write_report(result, out)
            return result.to_dict()

        return retrieve

    def _protocol(
        self, runtime: Runtime, request: EvaluationRequest
    ) -> tuple[RetrievalProtocol, Path | None]:
        """(validated protocol, image root): stored images are read from the image store.

        Every path a request names (root, protocol files, manifest, the images they list) is
        confined to the evaluation roots before the file is opened.
        """
        roots = runtime.settings.evaluation_roots

        def confined(protocol: RetrievalProtocol, base: Path | None) -> None:
            confine_images(((item.path, item.where) for item in protocol.images()), base, roots)

        if request.protocol == OFFICIAL:
            if not request.root:
                raise ProblemError(422, "invalid_request", "chexpert-8x200 needs the CheXpert root")
            chexpert_root = confine(request.root, roots, "CheXpert root")
            protocol_dir = confine_protocol_dir(request.protocol_dir, chexpert_root, roots)
            official = assemble_protocol(
                OFFICIAL,
                root=chexpert_root,
                protocol_dir=protocol_dir,
                check=lambda protocol: confined(protocol, chexpert_root),
            )
            return official, chexpert_root
        stored = request.protocol == "stored"
        root = runtime.store.root if stored else None
        images = self._stored_images(runtime.sessions) if stored else self._manifest(request, roots)
        protocol = assemble_protocol(
            request.protocol,
            root=root,
            images=images,
            categories=request.categories,
            text_queries=[
                TextQuery(category=c, text=t, where=f"text query {i}")
                for i, (c, t) in enumerate(request.text_queries, 1)
            ],
            candidates_per_category=request.candidates_per_category,
            queries_per_category=request.queries_per_category,
            seed=request.seed,
        )
        return protocol, root

    @staticmethod
    def _manifest(request: EvaluationRequest, roots: Sequence[Path]) -> list[LabelledImage]:
        """The labelled images of the request's manifest, every one inside the roots.

        An image's error names its manifest record, never its path or file name.
        """
        if not request.manifest:
            raise ProblemError(422, "invalid_request", "the manifest protocol needs a manifest")
        manifest = confine(request.manifest, roots, "manifest")
        images = manifest_images(str(manifest))
        confine_images(
            ((image.path, f"manifest record {n}") for n, image in enumerate(images, 1)), None, roots
        )
        return images

    @staticmethod
    def _confined_classification(
        runtime: Runtime, request: EvaluationRequest
    ) -> PreparedClassification:
        """The classification corpus, its manifest, root and images inside the evaluation roots."""
        roots = runtime.settings.evaluation_roots
        manifest = confine(request.manifest or "", roots, "manifest")
        root = confine(request.root, roots, "image root") if request.root else None
        wanted = dataclasses.replace(
            request.classification(),
            manifest=str(manifest),
            root=str(root) if root is not None else None,
        )
        return prepare_classification(
            wanted,
            check=lambda records: confine_images(((r.path, r.where) for r in records), None, roots),
        )

    @staticmethod
    def _stored_images(sessions: sessionmaker[Session]) -> list[LabelledImage]:
        with sessions() as session:
            rows = session.execute(
                select(Image.id, Image.image_path, Image.labels).order_by(Image.id)
            ).all()
        return [
            LabelledImage(path=path, labels=dict(labels or {}), where=f"stored image {image_id}")
            for image_id, path, labels in rows
        ]

    # -- the worker ----------------------------------------------------------------------

    def _update(self, sessions: sessionmaker[Session], run_id: int, **values: Any) -> None:
        with sessions() as session, session.begin():
            run = session.get(EvaluationRun, run_id)
            if run is not None:
                for key, value in values.items():
                    setattr(run, key, value)

    def _work(self, runtime: Runtime, run_id: int, work: Work, cancel: threading.Event) -> None:
        sessions = runtime.sessions
        last_write = [0.0]

        def progress(fraction: float, stage: str) -> None:
            now = time.monotonic()
            if now - last_write[0] >= PROGRESS_INTERVAL_S and fraction < 1.0:
                last_write[0] = now
                self._update(sessions, run_id, progress=min(max(fraction, 0.0), 0.99))

        try:
            report_dir = runtime.settings.data_dir / REPORTS_DIR / str(run_id)
            document = work(progress, cancel, report_dir)
            document["report_dir"] = f"{REPORTS_DIR}/{run_id}"
            self._update(
                sessions,
                run_id,
                status="succeeded",
                progress=1.0,
                results=document,
                finished_at=utcnow(),
                lease_expires_at=None,
            )
            logger.info("evaluation %d succeeded in %.1f s", run_id, document.get("seconds", 0.0))
        except EvaluationCancelled:
            self._finish_failed(sessions, run_id, "cancelled: its worker is stopping")
        except ModelError as exc:
            logger.warning("evaluation %d failed (%s): %s", run_id, exc.code, exc)
            self._finish_failed(sessions, run_id, f"{exc.code}: {exc}")
        except Exception:
            logger.exception("evaluation %d failed", run_id)
            self._finish_failed(sessions, run_id, "internal error; see the service log")

    def _finish_failed(self, sessions: sessionmaker[Session], run_id: int, error: str) -> None:
        try:
            self._update(
                sessions,
                run_id,
                status="failed",
                error=error,
                finished_at=utcnow(),
                lease_expires_at=None,
            )
        except Exception:
            # The database itself failed: the lease runs out and the run is reaped.
            logger.exception("could not record the failure of evaluation %d", run_id)


def run_duration(run: EvaluationRun) -> float | None:
    """Seconds from start to finish (or to now while running); None before it starts."""
    if run.started_at is None:
        return None
    end = run.finished_at or dt.datetime.now(dt.UTC)
    return (end - run.started_at).total_seconds()
