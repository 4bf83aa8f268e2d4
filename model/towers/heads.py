"""Projection heads from a tower's features into the shared embedding space.

ConVIRT projects both modalities with a non-linear head, Linear–ReLU–Linear (as in
SimCLR), and reports a single Linear layer as an ablation; both are available through
:class:`~model.config.ProjectionConfig`. Heads do not normalise: the model does, so
callers can still read the raw projection.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import InvalidConfigError, ProjectionConfig


class ProjectionHead(nn.Module):
    """(B, in_dim) features → (B, dim) projection.

    ``nonlinear``: Linear(in_dim, hidden) → ReLU → Linear(hidden, dim), with ``hidden``
    defaulting to ``in_dim``. ``linear``: Linear(in_dim, dim).
    """

    def __init__(self, in_dim: int, config: ProjectionConfig) -> None:
        super().__init__()
        if in_dim < 1:
            raise InvalidConfigError(f"projection input size {in_dim} is not positive")
        self.in_dim = in_dim
        self.out_dim = config.dim
        self.kind = config.kind
        if config.kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, config.dim))
        else:
            hidden = config.hidden_dim or in_dim
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, config.dim)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) → (B, dim)."""
        return self.net(features)  # (B, dim)
