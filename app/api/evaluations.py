"""``/evaluations``: start an evaluation in the background, follow it, list past runs.

Retrieval (``chexpert-8x200``, ``manifest``, ``stored``) and classification (``zero-shot``,
``linear-probe``) protocols run here as they do under ``convirt evaluate``.

``POST /evaluations`` answers 202 with the queued run (and its ``Location``); a request
that cannot be evaluated (missing image, category absent from the candidates, query among
the candidates, too few labelled images…) is a 422 problem naming the file and row, and a
second request while a run is in progress is a 409 ``evaluation_running`` problem.
Paths in the body are read by the server, and only under the evaluation roots
(``CONVIRT_EVALUATION_ROOTS``, :mod:`app.services.evaluation_inputs`): anything else is a
422 before a file is opened.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field, model_validator
from sqlalchemy import func, select

from app.api.deps import RuntimeDep, SessionDep
from app.api.problems import problem_responses
from app.api.uploads import json_body
from app.errors import ProblemError
from app.models import EvaluationRun
from app.schemas import MAX_ID, RequestModel
from app.security import require_api_key
from app.services.evaluations import EvaluationJobs, EvaluationRequest, run_duration

router = APIRouter(
    prefix="/evaluations", tags=["evaluations"], dependencies=[Depends(require_api_key)]
)

#: Longest path accepted in a request body.
MAX_PATH_CHARS: Final = 4096
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="Evaluation run id.")]


class TextQueryIn(RequestModel):
    category: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1, max_length=1000)


class EvaluationCreate(RequestModel):
    """What to evaluate the service's encoder bundle on."""

    protocol: Literal["chexpert-8x200", "manifest", "stored", "zero-shot", "linear-probe"] = Field(
        description="chexpert-8x200: official files over a CheXpert root; manifest: a "
        "labelled manifest; stored: the images stored in the service, with their labels; "
        "zero-shot: prompt-set AUROC on a labelled manifest; linear-probe: logistic "
        "regression on frozen features at 1/10/100 % of a manifest's training labels"
    )
    root: str | None = Field(
        default=None,
        max_length=MAX_PATH_CHARS,
        description="chexpert-8x200: CheXpert root; zero-shot/linear-probe: where the paths "
        "of a CheXpert CSV start (default: found from the CSV's place)",
    )
    protocol_dir: str | None = Field(
        default=None,
        max_length=MAX_PATH_CHARS,
        description="chexpert-8x200: folder with image-retrieval/ and text-retrieval/ "
        "(default: found under root)",
    )
    manifest: str | None = Field(
        default=None,
        max_length=MAX_PATH_CHARS,
        description="manifest, zero-shot, linear-probe: .csv or .jsonl manifest (or a "
        "CheXpert valid.csv/test.csv/train.csv for the last two)",
    )
    categories: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        max_length=32,
        description="manifest/stored: categories (default: the eight CheXpert 8x200 ones); "
        "zero-shot/linear-probe: the findings scored (default: all the set or corpus labels)",
    )
    candidates_per_category: int = Field(default=200, ge=1, le=100_000)
    queries_per_category: int = Field(default=10, ge=1, le=10_000)
    text_queries: list[TextQueryIn] | None = Field(
        default=None,
        max_length=1000,
        description="manifest/stored: text queries (default: the project's built-in ones)",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    ks: list[Annotated[int, Field(ge=1, le=100_000)]] = Field(
        default=[5, 10, 50], min_length=1, max_length=10
    )
    backbone: bool = Field(
        default=True,
        description="also score the backbone-only baseline (linear-probe: the ImageNet and "
        "random-init rows)",
    )
    random_repeats: int = Field(default=20, ge=1, le=1000)
    prompt_set: str | None = Field(
        default=None,
        max_length=64,
        description="zero-shot: a shipped prompt set (default chexpert-14)",
    )
    knn_k: int = Field(default=10, ge=1, le=1000, description="zero-shot: k-NN voters")
    bootstrap: int = Field(
        default=1000, ge=1, le=100_000, description="zero-shot: AUROC bootstrap resamples"
    )
    fractions: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default=[0.01, 0.1, 1.0],
        min_length=1,
        max_length=10,
        description="linear-probe: shares of the training split's labels",
    )
    draws: int = Field(default=3, ge=1, le=100, description="linear-probe: draws per fraction")
    task: Literal["auto", "multi-label", "multi-class"] = "auto"

    @model_validator(mode="after")
    def _fields_of_the_protocol(self) -> EvaluationCreate:
        if self.protocol in ("zero-shot", "linear-probe"):
            if not self.manifest:
                raise ValueError(f"protocol {self.protocol} needs manifest")
            if self.protocol_dir or self.text_queries:
                raise ValueError(f"protocol_dir and text_queries do not apply to {self.protocol}")
        elif self.protocol == "chexpert-8x200":
            if not self.root:
                raise ValueError("protocol chexpert-8x200 needs root")
            if self.manifest or self.categories or self.text_queries:
                raise ValueError("manifest, categories and text_queries do not apply here")
        else:
            if self.root or self.protocol_dir:
                raise ValueError(f"root and protocol_dir do not apply to {self.protocol}")
            if self.protocol == "manifest" and not self.manifest:
                raise ValueError("protocol manifest needs manifest")
            if self.protocol == "stored" and self.manifest:
                raise ValueError("manifest does not apply to stored")
        return self

    def to_request(self) -> EvaluationRequest:
        return EvaluationRequest(
            protocol=self.protocol,
            root=self.root,
            protocol_dir=self.protocol_dir,
            manifest=self.manifest,
            categories=tuple(self.categories) if self.categories else None,
            candidates_per_category=self.candidates_per_category,
            queries_per_category=self.queries_per_category,
            text_queries=tuple((q.category, q.text) for q in self.text_queries or ()),
            seed=self.seed,
            ks=tuple(sorted(set(self.ks))),
            backbone=self.backbone,
            random_repeats=self.random_repeats,
            prompt_set=self.prompt_set,
            knn_k=self.knn_k,
            bootstrap=self.bootstrap,
            fractions=tuple(sorted(set(self.fractions))),
            draws=self.draws,
            task=self.task,
        )


class EvaluationPublic(BaseModel):
    """One evaluation run. ``results`` is ``report.json``'s document once it succeeded."""

    id: int
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float = Field(description="0 to 1")
    protocol: str
    model_id: str
    params: dict[str, Any]
    summary: dict[str, dict[str, dict[str, float | None]]] | None = Field(
        default=None, description="mean scores: task → method → metric"
    )
    results: dict[str, Any] | None = None
    error: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None


class EvaluationList(BaseModel):
    total: int
    items: list[EvaluationPublic]


def _summary(results: dict[str, Any] | None) -> dict[str, dict[str, dict[str, float | None]]]:
    if not results:
        return {}
    return {
        task: {method: dict(scores.get("mean", {})) for method, scores in methods.items()}
        for task, methods in results.get("results", {}).items()
    }


def _public(run: EvaluationRun, *, with_results: bool) -> EvaluationPublic:
    seconds = run_duration(run)
    return EvaluationPublic(
        id=run.id,
        status=run.status,  # type: ignore[arg-type]
        progress=run.progress,
        protocol=run.protocol,
        model_id=run.model_id,
        params=dict(run.params or {}),
        summary=_summary(run.results) if run.results else None,
        results=run.results if with_results else None,
        error=run.error,
        created_at=run.created_at.isoformat(),
        started_at=run.started_at.isoformat() if run.started_at else None,
        finished_at=run.finished_at.isoformat() if run.finished_at else None,
        seconds=round(seconds, 3) if seconds is not None else None,
    )


def get_jobs(request: Request) -> EvaluationJobs:
    jobs: EvaluationJobs = request.app.state.evaluations
    return jobs


JobsDep = Annotated[EvaluationJobs, Depends(get_jobs)]


@router.post(
    "",
    status_code=202,
    response_model=EvaluationPublic,
    summary="Start an evaluation in the background",
    responses=problem_responses(409, 415, 422, 503),
    dependencies=[Depends(json_body)],
)
def create_evaluation(
    body: EvaluationCreate, request: Request, response: Response, runtime: RuntimeDep, jobs: JobsDep
) -> EvaluationPublic:
    # A sync route: FastAPI runs it in a worker thread, and reading the protocol files and
    # checking that every image exists (thousands of stats) must not block the event loop.
    run = jobs.submit(runtime, body.to_request())
    response.headers["Location"] = str(request.url_for("get_evaluation", run_id=str(run.id)))
    return _public(run, with_results=False)


@router.get(
    "",
    response_model=EvaluationList,
    summary="Past and current evaluation runs, newest first",
    responses=problem_responses(503),
)
def list_evaluations(
    session: SessionDep,
    runtime: RuntimeDep,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> EvaluationList:
    jobs.recover(runtime.sessions)
    total = int(session.scalar(select(func.count()).select_from(EvaluationRun)) or 0)
    runs = session.scalars(
        select(EvaluationRun)
        .order_by(EvaluationRun.created_at.desc(), EvaluationRun.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return EvaluationList(total=total, items=[_public(r, with_results=False) for r in runs])


@router.get(
    "/{run_id}",
    response_model=EvaluationPublic,
    summary="Status, progress and results of one run",
    responses=problem_responses(404, 503),
)
def get_evaluation(
    run_id: RunId, session: SessionDep, runtime: RuntimeDep, jobs: JobsDep
) -> EvaluationPublic:
    jobs.recover(runtime.sessions)
    run = session.get(EvaluationRun, run_id)
    if run is None:
        raise ProblemError(404, "evaluation_not_found", f"no evaluation run {run_id}")
    return _public(run, with_results=True)
