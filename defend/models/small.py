"""Classifiers for 32 px inputs: a small CNN, a CIFAR ResNet-18 and a Wide-ResNet (BatchNorm optional)."""
from __future__ import annotations

from torch import Tensor, nn

from .base import ARCHITECTURES, GapClassifier

__all__ = ["small_cnn", "resnet18_cifar", "wide_resnet"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _conv_bn(cin: int, cout: int, stride: int = 1, batchnorm: bool = True) -> list[nn.Module]:
    if not batchnorm:
        return [nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU()]
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


@ARCHITECTURES.register("small_cnn")
def small_cnn(num_classes: int = 10, width: int = 32, input_size: int = 32, mean=CIFAR_MEAN, std=CIFAR_STD,
              batchnorm: bool = True) -> GapClassifier:
    """Three conv stages (w, 2w, 4w channels) at 32, 16 and 8 px: CAM is 8x8 for 32 px inputs.

    ``batchnorm=False`` drops the BatchNorm layers (conv biases instead): under DDP each process normalises its own
    shard of the batch, so only a BN-free model trains exactly like one process with the whole batch."""
    w, bn = width, batchnorm
    stages = [
        nn.Sequential(*_conv_bn(3, w, batchnorm=bn), *_conv_bn(w, w, batchnorm=bn)),
        nn.Sequential(nn.MaxPool2d(2), *_conv_bn(w, 2 * w, batchnorm=bn), *_conv_bn(2 * w, 2 * w, batchnorm=bn)),
        nn.Sequential(nn.MaxPool2d(2), *_conv_bn(2 * w, 4 * w, batchnorm=bn), *_conv_bn(4 * w, 4 * w, batchnorm=bn)),
    ]
    return GapClassifier(stages, 4 * w, num_classes, mean, std, arch="small_cnn", input_size=input_size,
                         stage_channels=[w, 2 * w, 4 * w])


class BasicBlock(nn.Module):
    """Pre-activation-free ResNet basic block; ``batchnorm=False`` gives the reference's BN-free variant."""

    def __init__(self, cin: int, cout: int, stride: int, batchnorm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not batchnorm)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not batchnorm)
        self.bn2 = norm(cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not batchnorm), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.drop(out)))
        return self.relu(out + self.shortcut(x))


def _layer(cin: int, cout: int, blocks: int, stride: int, **kw) -> nn.Sequential:
    layers = [BasicBlock(cin, cout, stride, **kw)] + [BasicBlock(cout, cout, 1, **kw) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


@ARCHITECTURES.register("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, width: int = 64, input_size: int = 32, mean=CIFAR_MEAN, std=CIFAR_STD) -> GapClassifier:
    """ResNet-18 for 32 px inputs (3x3 stem, no max-pool); CAM is 4x4."""
    w = width
    stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
    stages = [
        nn.Sequential(stem, _layer(w, w, 2, 1)),
        _layer(w, 2 * w, 2, 2),
        _layer(2 * w, 4 * w, 2, 2),
        _layer(4 * w, 8 * w, 2, 2),
    ]
    return GapClassifier(stages, 8 * w, num_classes, mean, std, arch="resnet18_cifar", input_size=input_size,
                         stage_channels=[w, 2 * w, 4 * w, 8 * w])


@ARCHITECTURES.register("wide_resnet")
def wide_resnet(num_classes: int = 10, depth: int = 16, widen: int = 4, batchnorm: bool = True, dropout: float = 0.0,
                input_size: int = 32, mean=CIFAR_MEAN, std=CIFAR_STD) -> GapClassifier:
    """WRN-depth-widen (Zagoruyko & Komodakis). ``batchnorm=False`` matches the robust-training reference."""
    if (depth - 4) % 6:
        raise ValueError(f"wide_resnet depth must be 6n+4 (e.g. 16, 22, 28), got {depth}")
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    stem = nn.Conv2d(3, ch[0], 3, 1, 1, bias=not batchnorm)
    kw = {"batchnorm": batchnorm, "dropout": dropout}
    stages = [
        nn.Sequential(stem, _layer(ch[0], ch[1], n, 1, **kw)),
        _layer(ch[1], ch[2], n, 2, **kw),
        _layer(ch[2], ch[3], n, 2, **kw),
    ]
    return GapClassifier(stages, ch[3], num_classes, mean, std, arch="wide_resnet", input_size=input_size,
                         stage_channels=ch[1:])
