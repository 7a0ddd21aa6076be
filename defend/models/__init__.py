"""Classifier zoo: every model follows the :class:`GapClassifier` contract (CAM is exact); :func:`wrap_classifier`
brings any other ``nn.Module`` classifier under the same contract."""
from __future__ import annotations

from .base import ARCHITECTURES, GapClassifier, Normalize
from .imagenet import densenet169, resnet50, vgg16  # importing them registers the architectures
from .small import resnet18_cifar, small_cnn, wide_resnet
from .wrap import WrappedClassifier, wrap_classifier

__all__ = ["GapClassifier", "Normalize", "ARCHITECTURES", "build_classifier",
           "small_cnn", "resnet18_cifar", "wide_resnet", "resnet50", "densenet169", "vgg16",
           "wrap_classifier", "WrappedClassifier"]


def build_classifier(arch: str, num_classes: int, **kwargs) -> GapClassifier:
    """Build a zoo classifier by name; unknown names fail with the list of choices."""
    return ARCHITECTURES.get(arch)(num_classes=num_classes, **kwargs)
