"""The image anchor: a frozen copy of the image backbone, projected onto principal axes.

See :class:`model.config.AnchorConfig` for why a model carries one. The anchor's
projection is not learned: it is the principal-component basis of the untrained
backbone's pooled features on the training images, fitted once before training. Centring
on the training images' mean was measured to lift real-radiograph neighbours above the
backbone's raw cosine (``tests/benchmarks/quality_real.py``, figures in cpu-small); the
projection keeps the shared space at its agreed size.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from model.config import AnchorConfig, ImageTowerConfig, InvalidConfigError
from model.errors import ModelError
from model.towers.image import ImageTower, build_image_tower

logger = logging.getLogger(__name__)


class AnchorNotFittedError(ModelError):
    """The anchor's projection was used before it was fitted on training images."""

    code = "anchor_not_fitted"


class ImageAnchor(nn.Module):
    """(B, 3, S, S) normalised images → (B, dim) centred, projected backbone features.

    The backbone never learns and stays in eval mode, also while its model trains.
    ``mean``, ``basis`` and ``fitted`` are buffers, so checkpoints and bundles carry them.
    """

    def __init__(
        self, image: ImageTowerConfig, config: AnchorConfig, *, pretrained: bool | None = None
    ) -> None:
        super().__init__()
        self.tower: ImageTower = build_image_tower(image, pretrained=pretrained)
        self.tower.requires_grad_(False)
        self.tower.eval()
        features = self.tower.out_dim
        if config.dim > features:
            raise InvalidConfigError(
                f"anchor.dim: {config.dim} is more than the backbone's {features} features"
            )
        self.dim = config.dim
        #: The anchor's share of image→image similarity (``AnchorConfig.weight``).
        self.weight = config.weight
        self.mean: torch.Tensor
        self.basis: torch.Tensor
        self.fitted: torch.Tensor
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("basis", torch.zeros(config.dim, features))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has set the projection (here or in a loaded checkpoint)."""
        return bool(self.fitted.item())

    def train(self, mode: bool = True) -> ImageAnchor:
        super().train(mode)
        self.tower.eval()  # frozen: batch norm keeps its pretrained statistics
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, F) pooled features of the frozen backbone, in float32."""
        with torch.no_grad():
            return self.tower(x).float()  # (B, F)

    def fit(self, features: torch.Tensor) -> None:
        """Set the mean and the ``dim`` principal axes of (N, F) backbone features.

        With fewer images than ``dim`` the axes past the data's own span complete an
        orthonormal basis (any completion serves: the training images have no spread
        along it to keep).
        """
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0] or len(features) < 1:
            raise ModelError(
                f"the anchor is fitted on (N, {self.mean.shape[0]}) features, "
                f"got {tuple(features.shape)}"
            )
        features = features.detach().double().cpu()
        mean = features.mean(dim=0)  # (F,)
        centred = features - mean  # (N, F)
        # Eigenvectors of the (F, F) scatter matrix: its size does not grow with N.
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        axes = vectors.flip(-1)[:, : self.dim].T  # (dim, F), largest variance first
        with torch.no_grad():
            self.mean.copy_(mean.to(self.mean))
            self.basis.copy_(axes.to(self.basis))
            self.fitted.fill_(True)
        logger.info("image anchor fitted on %d images (%d principal axes)", len(features), self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, dim), not normalised."""
        if not self.is_fitted:
            raise AnchorNotFittedError("the image anchor has not been fitted on training images")
        centred = self.features(x) - self.mean  # (B, F)
        return centred @ self.basis.T  # (B, dim)
