"""torchvision classifiers at any input size, rearranged into the GAP contract (CAM is exact), one builder per family.

ResNets (resnet18/34/50/101, wide_resnet50_2: CAM on ``layer4``), DenseNets (densenet121/169: CAM on the final
ReLU(norm5) features) and VGG-GAP (vgg16/vgg16_bn: the convolutional trunk without its last max-pool, then GAP ->
linear; torchvision's fully connected classifier is dropped, CAM needs GAP -> linear).

No weights are ever downloaded: ``pretrained`` is an optional path to a local torchvision state dict, loaded with
``torch.load(weights_only=True)`` (see :func:`read_weights` for the layouts accepted). Its head is kept when its class
count is ``num_classes``, else a fresh head is trained on top of the trunk.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from ..io import CheckpointError
from .base import ARCHITECTURES, GapClassifier

__all__ = ["resnet50", "densenet169", "vgg16", "IMAGENET_MEAN", "IMAGENET_STD", "TORCHVISION", "Weights",
           "read_weights", "torchvision_net"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: registered name -> whether the zoo keeps torchvision's own head (False for VGG-GAP), for every family below
TORCHVISION: dict[str, bool] = {}
#: the prefixes a wrapped state dict may put before torchvision's names (DataParallel, RobustBench, nn.Sequential)
_PREFIX = re.compile(r"^(module|model|net|\d+)\.")


@dataclass
class Weights:
    """A local state dict in torchvision's names, with the normalisation it carried (``None`` when it had none)."""

    state: dict[str, Tensor]
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: str = "torchvision"

    @property
    def num_classes(self) -> int | None:
        """Rows of the last 2-D weight (the final linear layer), ``None`` when there is none."""
        mats = [v for k, v in self.state.items() if k.endswith("weight") and v.dim() == 2]
        return int(mats[-1].shape[0]) if mats else None


def _norm_pair(state: dict[str, Tensor]) -> tuple[list[float] | None, list[float] | None]:
    """Pop the normalisation a file carries: RobustBench's ``mu`` / ``sigma`` or a Normalize layer's ``mean``/``std``."""
    for lo, hi in (("mu", "sigma"), ("mean", "std")):
        keys = [k for k in state if k == lo or k.endswith("." + lo)]
        if len(keys) == 1 and keys[0][: -len(lo)] + hi in state:
            mean, std = state.pop(keys[0]), state.pop(keys[0][: -len(lo)] + hi)
            return [float(v) for v in mean.flatten()], [float(v) for v in std.flatten()]
    return None, None


def read_weights(path: str | Path) -> Weights:
    """A local weights file as torchvision names: a plain state dict, one under ``state_dict`` / ``model``, or a
    RobustBench-format one (names prefixed ``model.`` / ``module.`` / ``0.``, normalisation as ``mu`` / ``sigma`` or a
    Normalize layer's ``mean`` / ``std``). Nothing in it runs: ``torch.load(weights_only=True)``."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path} (weights are never downloaded)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle that wants to run code
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot load {path} safely: {first[:200]}") from None
    for key in ("state_dict", "model", "net"):
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(f"{path} does not look like torchvision weights (not a state dict of tensors)")
    state, layout = dict(raw), "torchvision"
    mean, std = _norm_pair(state)
    while state and len({_PREFIX.match(k) and _PREFIX.match(k).group(0) for k in state}) == 1 \
            and _PREFIX.match(next(iter(state))):
        cut = len(_PREFIX.match(next(iter(state))).group(0))
        state, layout = {k[cut:]: v for k, v in state.items()}, "prefixed (RobustBench-format)"
    return Weights(state, mean, std, layout if mean is None else f"{layout}, with its normalisation")


def torchvision_net(arch: str, num_classes: int, weights: Weights | None = None) -> nn.Module:
    """torchvision's ``arch`` (a registered name) with ``num_classes`` outputs; ``weights`` must fit it exactly."""
    net = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if weights is not None:
        try:
            net.load_state_dict(weights.state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"the weights do not look like torchvision {arch} weights: "
                             f"{' '.join(str(exc).split())[:300]}") from None
    return net


def _pretrained(arch: str, num_classes: int, pretrained: str | None) -> tuple[nn.Module, bool]:
    """torchvision ``arch`` with the local weights ``pretrained`` (their own head); whether that head has
    ``num_classes`` outputs (then it is kept)."""
    if pretrained is None:  # torchvision's default 1000 classes: the trunk draws the random init it always drew
        return torchvision_net(arch, 1000), False
    weights = read_weights(pretrained)
    file_classes = weights.num_classes
    if file_classes is None:
        raise ValueError(f"{pretrained} does not look like torchvision weights for {arch} (no linear layer in it)")
    try:
        return torchvision_net(arch, file_classes, weights), file_classes == num_classes
    except ValueError as exc:
        raise ValueError(f"{pretrained} does not look like torchvision weights for {arch} ({exc})") from None


def _family(names: Sequence[str], doc: str, keeps_head: bool = True) -> Callable[[Callable], Callable]:
    """Register ``build(arch, net, **options) -> stages, channels`` once per torchvision name of the family."""
    def register(split: Callable) -> Callable:
        def make(arch: str) -> Callable[..., GapClassifier]:
            def builder(num_classes: int = 1000, pretrained: str | None = None, input_size: int = 224,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> GapClassifier:
                net, keep_head = _pretrained(arch, num_classes, pretrained)
                stages, channels, fc = split(net)
                model = GapClassifier(stages, channels[-1], num_classes, mean, std, arch=arch,
                                      input_size=input_size, stage_channels=channels)
                if keep_head and fc is not None:
                    model.head.load_state_dict(fc.state_dict())
                return model
            builder.__name__ = builder.__qualname__ = arch
            builder.__doc__ = f"torchvision {arch}: {doc}"
            return builder

        for name in names:
            TORCHVISION[name] = keeps_head
            ARCHITECTURES.register(name)(make(name))
        return split
    return register


def _last_bn(block: nn.Module) -> int:
    return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


@_family(["resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2"], "CAM on layer4 (7x7 at 224 px)")
def _resnet(net: nn.Module) -> tuple[list[nn.Module], list[int], nn.Linear]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    return [stem, net.layer2, net.layer3, net.layer4], [_last_bn(layer[-1]) for layer in layers], net.fc


@_family(["densenet121", "densenet169"], "split after each transition; CAM on the final ReLU(norm5) features")
def _densenet(net: nn.Module) -> tuple[list[nn.Module], list[int], nn.Linear]:
    stages, channels, cur = [], [], []
    for name, layer in net.features.named_children():
        cur.append(layer)
        if name.startswith("transition"):
            stages.append(nn.Sequential(*cur))
            channels.append(layer.conv.out_channels)
            cur = []
    stages.append(nn.Sequential(*cur, nn.ReLU()))
    return stages, [*channels, net.features.norm5.num_features], net.classifier


@_family(["vgg16", "vgg16_bn"], "VGG-GAP, the trunk without its last max-pool (14x14 at 224 px), then GAP -> linear; "
         "torchvision's fully connected classifier is dropped (CAM needs GAP -> linear)", keeps_head=False)
def _vgg(net: nn.Module) -> tuple[list[nn.Module], list[int], None]:
    stages, channels, cur = [], [], []
    for layer in list(net.features.children())[:-1]:  # split at the max-pools: stages end at 112, 56, 28, 14 px
        if isinstance(layer, nn.MaxPool2d) and cur:
            stages.append(nn.Sequential(*cur))
            cur = []
        cur.append(layer)
    stages.append(nn.Sequential(*cur))
    channels = [[m for m in s.modules() if isinstance(m, nn.Conv2d)][-1].out_channels for s in stages]
    return stages, channels, None


resnet50 = ARCHITECTURES.get("resnet50")
densenet169 = ARCHITECTURES.get("densenet169")
_vgg16 = ARCHITECTURES.get("vgg16")


def vgg16(num_classes: int = 1000, pretrained: str | None = None, input_size: int = 224,
          in_channels: int = 3) -> GapClassifier:
    """The registered ``vgg16`` (VGG-GAP), with ``in_channels`` other than 3 (a fresh first conv, inputs centred on
    0.5 with unit spread): the detector reads stacked interpretation maps with it. The first conv is drawn before
    the head, as earlier versions did, so a seeded trunk is the one they drew."""
    if in_channels == 3:
        return _vgg16(num_classes, pretrained, input_size)
    net, _ = _pretrained("vgg16", num_classes, pretrained)
    stages, channels, _ = _vgg(net)
    first = stages[0][0]
    stages[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1, 1)
    model = GapClassifier(stages, channels[-1], num_classes, (0.0,) * in_channels, (1.0,) * in_channels,
                          arch="vgg16", input_size=input_size, stage_channels=channels)
    model.in_channels = in_channels
    return model
