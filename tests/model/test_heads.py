"""Projection heads: the paper's Linear–ReLU–Linear and the linear ablation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import InvalidConfigError, ProjectionConfig
from model.towers.heads import ProjectionHead


def test_nonlinear_head_is_linear_relu_linear_into_the_shared_dim() -> None:
    head = ProjectionHead(1280, ProjectionConfig())
    layers = list(head.net)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    first, last = layers[0], layers[2]
    assert isinstance(first, nn.Linear)
    assert isinstance(last, nn.Linear)
    assert (first.in_features, first.out_features) == (1280, 1280)  # hidden = input
    assert (last.in_features, last.out_features) == (1280, 512)
    assert head(torch.randn(4, 1280)).shape == (4, 512)


def test_hidden_and_output_sizes_are_configurable() -> None:
    head = ProjectionHead(384, ProjectionConfig(dim=128, hidden_dim=64))
    assert head.net[0].out_features == 64
    assert head(torch.randn(2, 384)).shape == (2, 128)
    assert head.out_dim == 128


def test_linear_head_is_affine_and_nonlinear_head_is_not() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    linear = ProjectionHead(16, ProjectionConfig(dim=8, kind="linear"))
    assert len(linear.net) == 1
    # f(a + b) = f(a) + f(b) − f(0) holds exactly for an affine map.
    zero = torch.zeros(3, 16)
    torch.testing.assert_close(linear(a + b), linear(a) + linear(b) - linear(zero))
    nonlinear = ProjectionHead(16, ProjectionConfig(dim=8))
    assert not torch.allclose(nonlinear(a + b), nonlinear(a) + nonlinear(b) - nonlinear(zero))


def test_heads_do_not_normalise() -> None:
    head = ProjectionHead(16, ProjectionConfig(dim=8, kind="linear"))
    norms = head(100 * torch.randn(5, 16)).norm(dim=1)
    assert not torch.allclose(norms, torch.ones(5))


def test_bad_input_size_is_rejected() -> None:
    with pytest.raises(InvalidConfigError):
        ProjectionHead(0, ProjectionConfig())
