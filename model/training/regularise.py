"""Keeping a pretrained image backbone's features while training: LR groups and L2-SP.

A ConVIRT run on a small corpus pulls the ImageNet backbone towards what separates that
corpus's pairs and away from the general sight that real radiographs need (measured by
``tests/benchmarks/quality_real.py``). :class:`~model.training.config.OptimConfig`
offers three restraints, all on the image backbone alone: a lower learning rate, a
number of first steps where it stands still while the heads learn (LP-FT), and an L2-SP
penalty towards its initial weights.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from model.convirt import EncoderModel
    from model.training.config import OptimConfig, TrainConfig

logger = logging.getLogger(__name__)


def image_backbone(module: EncoderModel) -> nn.Module | None:
    """The image backbone of a ConVIRT model; None for an imported model (one network)."""
    return getattr(module, "image_encoder", None)


def backbone_param_groups(module: EncoderModel, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the image backbone's (scaled, maybe frozen first), the rest.

    Without either option there is one group, as before these options existed, so the
    optimizer state of older checkpoints still loads when their runs are resumed.
    """
    backbone = image_backbone(module)
    if backbone is not None and optim.image_backbone_lr_scale == 0.0:
        # Never to move: no gradients at all, so no backward pass through the backbone
        # (a CPU step is that much cheaper), and no optimizer state for it.
        backbone.requires_grad_(False)
        logger.info("image backbone: frozen (learning rate x0)")
    mine = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    trainable = [p for p in module.parameters() if p.requires_grad]
    heads = [p for p in trainable if id(p) not in mine]
    tower = [p for p in trainable if id(p) in mine]
    scaled = optim.image_backbone_lr_scale != 1.0 or optim.image_backbone_frozen_steps > 0
    if not tower or not scaled:
        return [{"params": trainable}]
    logger.info(
        "image backbone: learning rate x%g, still for the first %d steps",
        optim.image_backbone_lr_scale,
        optim.image_backbone_frozen_steps,
    )
    return [
        {"params": heads},
        {
            "params": tower,
            "lr_scale": optim.image_backbone_lr_scale,
            "frozen_steps": optim.image_backbone_frozen_steps,
        },
    ]


class L2SP:
    """``alpha / 2 * sum ||w - w0||^2`` over the image backbone's trainable weights.

    Args:
        params: the backbone's trainable parameters.
        anchors: their initial values ``w0`` (same order, detached copies).
        alpha: the penalty's weight.
    """

    def __init__(
        self, params: list[nn.Parameter], anchors: list[torch.Tensor], alpha: float
    ) -> None:
        self.params = params
        self.anchors = anchors
        self.alpha = alpha

    @classmethod
    def of(cls, module: EncoderModel, alpha: float, anchor: nn.Module | None = None) -> L2SP | None:
        """The penalty for ``module``'s backbone, anchored at its current weights.

        ``anchor`` is another backbone of the same architecture whose weights are the
        anchor instead (a resumed run: its start was the pretrained backbone). None when
        ``alpha`` is 0 or the model has no separate image backbone.
        """
        backbone = image_backbone(module)
        if alpha <= 0.0 or backbone is None:
            return None
        source = dict((anchor or backbone).named_parameters())
        pairs = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
        params = [p for _, p in pairs]
        anchors = [source[n].detach().clone().to(p.device) for n, p in pairs]
        logger.info("L2-SP towards the initial backbone, alpha %g", alpha)
        return cls(params, anchors, alpha)

    def penalty(self) -> torch.Tensor:
        """The penalty (a scalar with gradient into the backbone)."""
        total = sum(
            ((p.float() - a.float()) ** 2).sum()
            for p, a in zip(self.params, self.anchors, strict=True)
        )
        return 0.5 * self.alpha * torch.as_tensor(total)


def l2sp_for_run(module: EncoderModel, config: TrainConfig, *, resumed: bool) -> L2SP | None:
    """The run's L2-SP penalty (None when ``optim.l2sp`` is 0).

    It pulls towards the run's start: the weights now, or for a resumed run (whose weights
    have moved) the pretrained backbone it started from.
    """
    start = None
    if resumed and config.optim.l2sp > 0 and config.model.imported is None:
        from model.towers.image import build_image_tower

        start = build_image_tower(config.model.image)
    return L2SP.of(module, config.optim.l2sp, start)
