"""ImageNet-size classifiers (224 px) from torchvision, rearranged into the GAP contract.

No weights are ever downloaded: ``pretrained`` is an optional path to a local torchvision state dict,
loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from .base import ARCHITECTURES, GapClassifier

__all__ = ["resnet50", "densenet169", "vgg16", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_local(net: nn.Module, pretrained: str | None) -> None:
    if pretrained is None:
        return
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path} (weights are never downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if len(missing) > 10 or unexpected:
        raise ValueError(f"{path} does not look like torchvision weights for this architecture "
                         f"(missing {len(missing)} keys, unexpected {len(unexpected)})")


def _head(net: GapClassifier, fc: nn.Linear, num_classes: int) -> None:
    if num_classes == fc.out_features:
        net.head.load_state_dict(fc.state_dict())


@ARCHITECTURES.register("resnet50")
def resnet50(num_classes: int = 1000, pretrained: str | None = None, input_size: int = 224) -> GapClassifier:
    """torchvision ResNet-50; CAM on ``layer4`` (7x7 at 224 px)."""
    net = tvm.resnet50(weights=None)
    _load_local(net, pretrained)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    model = GapClassifier([stem, net.layer2, net.layer3, net.layer4], 2048, num_classes, IMAGENET_MEAN, IMAGENET_STD,
                          arch="resnet50", input_size=input_size, stage_channels=[256, 512, 1024, 2048])
    _head(model, net.fc, num_classes)
    return model


@ARCHITECTURES.register("densenet169")
def densenet169(num_classes: int = 1000, pretrained: str | None = None, input_size: int = 224) -> GapClassifier:
    """torchvision DenseNet-169 split after each transition; CAM on the final ReLU(norm5) features."""
    net = tvm.densenet169(weights=None)
    _load_local(net, pretrained)
    f = net.features
    stages = [
        nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0, f.denseblock1, f.transition1),
        nn.Sequential(f.denseblock2, f.transition2),
        nn.Sequential(f.denseblock3, f.transition3),
        nn.Sequential(f.denseblock4, f.norm5, nn.ReLU()),
    ]
    model = GapClassifier(stages, 1664, num_classes, IMAGENET_MEAN, IMAGENET_STD, arch="densenet169",
                          input_size=input_size, stage_channels=[128, 256, 640, 1664])
    _head(model, net.classifier, num_classes)
    return model


@ARCHITECTURES.register("vgg16")
def vgg16(num_classes: int = 1000, pretrained: str | None = None, input_size: int = 224, in_channels: int = 3) -> GapClassifier:
    """VGG-16 convolutional trunk without its last max-pool (14x14 at 224 px), then GAP -> linear (VGG-GAP).

    The fully connected classifier of torchvision's VGG is dropped: the CAM contract needs GAP -> linear.
    """
    net = tvm.vgg16(weights=None)
    _load_local(net, pretrained)
    layers = list(net.features.children())[:-1]
    if in_channels != 3:
        first = layers[0]
        layers[0] = nn.Conv2d(in_channels, first.out_channels, 3, 1, 1)
    # split at the max-pools: stages end at 112, 56, 28, 14 px
    stages, cur = [], []
    for layer in layers:
        if isinstance(layer, nn.MaxPool2d) and cur:
            stages.append(nn.Sequential(*cur))
            cur = []
        cur.append(layer)
    stages.append(nn.Sequential(*cur))
    mean = IMAGENET_MEAN if in_channels == 3 else (0.0,) * in_channels
    std = IMAGENET_STD if in_channels == 3 else (1.0,) * in_channels
    return GapClassifier(stages, 512, num_classes, mean, std, arch="vgg16", input_size=input_size,
                         stage_channels=[64, 128, 256, 512, 512])
