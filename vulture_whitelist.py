"""Names the dead-code check (vulture, run by ``make lint``) cannot see being used.

vulture reads app/, model/, index/ and docker/ and reports definitions that nothing in
them uses. Routes and pydantic validators are skipped by their decorators (see
``[tool.vulture]`` in pyproject.toml); what remains below is called by a framework or
read by a file format, never by our own code. Add a name here only for such a reason:
anything else vulture reports is dead and is deleted, together with the tests that kept
it alive. The file is parsed, never imported or run.
"""

import faiss
from pydantic import BaseModel
from pydicom import Dataset
from pynetdicom import AE
from requests import Session

from app.api.classify import FindingPublic
from app.main import create_worker_app
from app.models import Base, EncoderModel, Image, UTCDateTime
from app.schemas import ImageRecord, SearchPublic, ServingModelPublic, UploadResponse
from app.services.budget import PixelBudget
from index.faiss_index import VectorIndex
from index.manifest import IndexManifest
from model.data.synthetic.anatomy import Geometry
from model.inputs.reports import IUReport
from model.loss import ConVIRTLoss
from model.training.data import EpochBatchSampler

# torch calls it when it prints a module.
ConVIRTLoss.extra_repr

# pydantic reads each model's configuration off the class.
BaseModel.model_config

# SQLAlchemy reads these off a TypeDecorator and a declarative base, and the relationships
# are named by the other side's back_populates and carry the delete cascade.
UTCDateTime.impl
UTCDateTime.cache_ok
UTCDateTime.process_bind_param
UTCDateTime.process_result_value
UTCDateTime.python_type
Base.metadata
Base.type_annotation_map
Image.embeddings
EncoderModel.embeddings

# Response fields filled by keyword (``**counts``, ``took_ms=``) or read off a row by
# pydantic (``from_attributes``), and read by clients.
UploadResponse.failed
SearchPublic.took_ms
ImageRecord.updated_at
Image.updated_at

# Written into manifest.json for people and tools that inspect a saved index.
IndexManifest.faiss_version

# The index's HNSW upkeep, documented in index.faiss_index for operators: force the graph
# rebuild that ``remove`` otherwise starts on its own, and count the removed slots it drops.
VectorIndex.compact
VectorIndex.tombstones

# FAISS reads the removal selector off the search parameters it is handed.
faiss.SearchParametersHNSW.sel

# Response fields read by clients, filled by keyword.
FindingPublic.knn
ServingModelPublic.synthetic_data

# Parsed fields of an IU X-ray report and of a synthetic study's geometry: kept whole
# for whoever inspects a record or a drawing (the synthetic tests measure the drawing
# against this geometry), though the pipeline reads only some of them.
IUReport.report_id
IUReport.mesh_automatic
Geometry.heart_width
Geometry.thorax_width
Geometry.heart_row
Geometry.midline_x
Geometry.costophrenic_angles
Geometry.diaphragm_domes

# The sampler's statement of which samples make one global batch: the oracle that the
# distributed tests hold every process's shard against.
EpochBatchSampler.global_batch

# The pixels held now: what the budget tests and an operator's debugger read.
PixelBudget.in_use

# uvicorn imports it by name ("app.main:create_worker_app") in each `serve --workers` process.
create_worker_app
# pydicom writes these dataset attributes into the C-STORE response; pynetdicom's AE and
# requests' Session read theirs when an association or a request is made.
Dataset.Status
Dataset.ErrorComment
AE.maximum_pdu_size
AE.require_calling_aet
Session.auth
