"""Classifier zoo: every model follows the :class:`GapClassifier` contract (CAM is exact)."""
from __future__ import annotations

from typing import Callable

from .base import GapClassifier, Normalize
from .imagenet import densenet169, resnet50, vgg16
from .small import resnet18_cifar, small_cnn, wide_resnet

__all__ = ["GapClassifier", "Normalize", "ARCHITECTURES", "build_classifier"]

ARCHITECTURES: dict[str, Callable[..., GapClassifier]] = {
    "small_cnn": small_cnn,
    "resnet18_cifar": resnet18_cifar,
    "wide_resnet": wide_resnet,
    "resnet50": resnet50,
    "densenet169": densenet169,
    "vgg16": vgg16,
}


def build_classifier(arch: str, num_classes: int, **kwargs) -> GapClassifier:
    """Build a zoo classifier by name; unknown names fail with the list of choices."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model '{arch}'; choose one of: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](num_classes=num_classes, **kwargs)
