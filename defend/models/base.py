"""The classifier contract: normalise -> features (stages) -> global average pool -> linear head.

Every classifier of the zoo is a :class:`GapClassifier`. Inputs are images in [0, 1]; the normalisation
lives inside the model. Because the head is linear on globally average-pooled features, CAM is exact:
``logit_c = mean_ij(sum_k w_kc a_k[i, j]) + b_c``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attacks.registry import Registry

__all__ = ["Normalize", "GapClassifier", "ARCHITECTURES"]

#: classifier builders by name (``@ARCHITECTURES.register("name")`` where each is defined)
ARCHITECTURES: Registry = Registry("model")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics stored as buffers (they travel with checkpoints)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class GapClassifier(nn.Module):
    """``head(pool(features(normalize(x))))`` with the pieces exposed by name.

    ``features`` is an ``nn.Sequential`` of stages; :meth:`forward_stages` returns every stage output
    (the multi-scale encoder features used by RTS), :meth:`forward_features` the last one (used by CAM).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        num_features: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        arch: str,
        input_size: int,
        stage_channels: Sequence[int],
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Linear(num_features, num_classes)
        self.arch = arch
        self.num_classes = num_classes
        self.input_size = input_size
        self.in_channels = len(list(mean))
        self.stage_channels = list(stage_channels)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Outputs of every feature stage, shallow to deep."""
        out, h = [], self.normalize(x)
        for stage in self.features:
            h = stage(h)
            out.append(h)
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """Last convolutional feature maps ``[N, K, h, w]`` (the CAM activations ``a_k``)."""
        return self.features(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.forward_features(x)))

    def describe(self) -> dict:
        """What a checkpoint must carry to check that it fits."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "mean": [float(v) for v in self.normalize.mean.flatten()],
            "std": [float(v) for v in self.normalize.std.flatten()],
        }
