"""Bring your own classifier: :func:`wrap_classifier` puts any ``nn.Module`` classifier under the zoo's contract.

The interpreters of :mod:`attacks` read a classifier through ``forward_features(x)`` (the CAM activations),
``pool`` and ``head`` (``logits = head(pool(features))``), and RTS through ``forward_stages(x)`` /
``stage_channels``. The wrapper gets the features with forward hooks on named layers (the forward stops at the last
one), puts the normalisation inside (inputs stay in [0, 1]) and checks, on a probe batch, that
``head(pool(features))`` is the module's own output: the wrapped model is the user's model.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Normalize

__all__ = ["WrappedClassifier", "wrap_classifier"]


class _Stop(Exception):
    """Raised by the last hook: the layers after the features are not run."""


class WrappedClassifier(nn.Module):
    """``head(pool(features(normalize(x))))`` around a user's module ``net``, its features read by forward hooks.

    ``head`` is an ``nn.Linear`` on the global average of the features (CAM is exact) or any module from the feature
    map to the logits (``pool`` is then the identity; CAM refuses it, Grad-CAM and the rest work)."""

    def __init__(self, net: nn.Module, feature_layer: str, head: nn.Module, mean: Sequence[float],
                 std: Sequence[float], *, stage_layers: Sequence[str], input_size: int, arch: str) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.head = head
        linear = isinstance(head, nn.Linear)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)) if linear else nn.Identity()
        self.feature_layer, self.stage_layers = feature_layer, [*stage_layers]
        self.arch, self.input_size, self.in_channels = arch, int(input_size), len(list(mean))
        self.num_classes, self.stage_channels = 0, []  # set by wrap_classifier's probe

    def _run_to(self, x: Tensor, names: Sequence[str]) -> list[Tensor]:
        """Outputs of the layers ``names`` (in forward order) on ``x``; the forward stops after the last one."""
        out: dict[str, Tensor] = {}
        layers = dict(self.net.named_modules())

        def hook(name: str):
            def keep(_module: nn.Module, _inputs: object, output: Tensor) -> None:
                out.setdefault(name, output)
                if name == names[-1]:
                    raise _Stop
            return keep

        handles = [layers[n].register_forward_hook(hook(n)) for n in names]
        try:
            self.net(self.normalize(x))
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in out]
        if missing:
            raise RuntimeError(f"{self.arch}: layer(s) {missing} did not run before '{names[-1]}' in the forward pass")
        return [out[n] for n in names]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Outputs of the stage layers, shallow to deep (the last is the feature layer)."""
        return self._run_to(x, self.stage_layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature layer's maps ``[N, K, h, w]`` (the CAM activations)."""
        return self._run_to(x, [self.feature_layer])[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.forward_features(x)))

    def describe(self) -> dict:
        """What the wrapped model is (the card's system section)."""
        return {"arch": self.arch, "num_classes": self.num_classes, "input_size": self.input_size,
                "in_channels": self.in_channels, "feature_layer": self.feature_layer,
                "mean": [float(v) for v in self.normalize.mean.flatten()],
                "std": [float(v) for v in self.normalize.std.flatten()]}


def _layer_names(net: nn.Module, names: Sequence[str]) -> None:
    known = dict(net.named_modules())
    for name in names:
        if not name or name not in known:
            top = ", ".join(n for n, _ in net.named_children())
            raise ValueError(f"wrap_classifier: {type(net).__name__} has no layer {name!r} (its top-level layers: "
                             f"{top}); name the layer whose output are the CAM feature maps with feature_layer=")


def _find_head(net: nn.Module, head: nn.Module | None) -> nn.Module:
    if head is not None:
        return head
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"wrap_classifier: {type(net).__name__} has no nn.Linear to use as the head; pass head= (a "
                         "module from the feature maps to the logits)")
    return linears[-1]


@torch.no_grad()
def _probe(model: WrappedClassifier) -> None:
    """Check on a seeded batch (eval mode) that ``head(pool(features))`` is the module's own output; set
    ``num_classes`` and ``stage_channels``. Any mismatch is a one-line ``ValueError``."""
    net, size = model.net, model.input_size
    p = next(iter(net.parameters()), torch.zeros(()))
    x = torch.rand(2, model.in_channels, size, size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        try:
            ref = net(model.normalize(x))
        except Exception as exc:
            raise ValueError(f"wrap_classifier: {model.arch} fails on a {list(x.shape)} input in [0, 1] "
                             f"({' '.join(str(exc).split())[:160]}); give its input_size= and the mean/std of its "
                             "channels") from None
        stages = model.forward_stages(x)
        feats = stages[-1]
        if feats.dim() != 4:
            raise ValueError(f"wrap_classifier: layer {model.feature_layer!r} gives {list(feats.shape)} outputs, not "
                             "feature maps [N, C, h, w]; name the last convolutional block with feature_layer=")
        _check_head(model, feats, ref)
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag
    model.num_classes, model.stage_channels = int(ref.shape[1]), [int(s.shape[1]) for s in stages]
    if model.num_classes < 2:
        raise ValueError(f"wrap_classifier: {model.arch} gives {model.num_classes} logit(s); a classifier needs >= 2")


def _check_head(model: WrappedClassifier, feats: Tensor, ref: Tensor) -> None:
    head, layer = model.head, model.feature_layer
    if isinstance(head, nn.Linear) and feats.shape[1] != head.in_features:
        raise ValueError(f"wrap_classifier: layer {layer!r} has {feats.shape[1]} channels but the head nn.Linear takes "
                         f"{head.in_features} inputs; name the layer whose global average feeds it (feature_layer=)")
    try:
        got = head(model.pool(feats))
    except Exception as exc:
        raise ValueError(f"wrap_classifier: head(features of {layer!r}) fails "
                         f"({' '.join(str(exc).split())[:160]}); pass a head= that maps those features to logits") from None
    if not (isinstance(ref, Tensor) and got.shape == ref.shape):
        raise ValueError(f"wrap_classifier: {model.arch} does not return logits [N, K] the head reproduces "
                         f"(head gives {list(got.shape)}); pass head= or wrap a module that returns logits")
    diff = float((got - ref).abs().max())
    if diff > 1e-4 * max(1.0, float(ref.abs().max())):
        what = "its last nn.Linear on the global average of" if isinstance(head, nn.Linear) else "head(features of"
        raise ValueError(f"wrap_classifier: {model.arch}'s logits are not {what} {layer!r} (largest difference "
                         f"{diff:.3g}); CAM needs GAP -> linear after the feature layer: name that layer with "
                         "feature_layer=, or pass head= a module from its maps to the logits (CAM is then refused)")


def wrap_classifier(module: nn.Module, feature_layer: str = "layer4", mean: Sequence[float] = (0.0, 0.0, 0.0),
                    std: Sequence[float] = (1.0, 1.0, 1.0), head: nn.Module | None = None, *,
                    stage_layers: Sequence[str] | None = None, input_size: int = 224,
                    arch: str | None = None) -> WrappedClassifier:
    """Make the classifier ``module`` attackable and explainable by every interpreter of :mod:`attacks`.

    Args:
        module: any ``nn.Module`` mapping normalised images ``[N, C, H, W]`` to logits ``[N, K]``.
        feature_layer: dotted name of the layer whose output maps are the CAM activations (``layer4`` for
            torchvision's ResNets, ``features`` for its DenseNets and VGGs).
        mean, std: the normalisation ``module`` expects; it is put inside the wrapper (inputs stay in [0, 1]).
        head: the ``nn.Linear`` applied to the global average of the feature maps (default: the last ``nn.Linear``
            of ``module``), or any module from the feature maps to the logits (then CAM is refused in one line).
        stage_layers: layers for RTS's multi-scale encoder, shallow to deep, ending at ``feature_layer``.
        input_size: side of the square probe images the check runs on (and the model's declared input size).
        arch: name for cards and errors (default: the module's class name).

    The check ``head(pool(features)) == module(normalize(x))`` runs once on a seeded probe batch in eval mode; a
    module that fails it is refused with one line naming what to change.
    """
    if len(list(mean)) != len(list(std)) or not list(mean):
        raise ValueError(f"wrap_classifier: mean {list(mean)} and std {list(std)} need one value per input channel")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"wrap_classifier: std {list(std)} must be positive")
    stages = list(stage_layers or [feature_layer])
    if stages[-1] != feature_layer:
        raise ValueError(f"wrap_classifier: stage_layers {stages} must end at the feature layer {feature_layer!r}")
    _layer_names(module, stages)
    model = WrappedClassifier(module, feature_layer, _find_head(module, head), mean, std, stage_layers=stages,
                              input_size=input_size, arch=arch or type(module).__name__)
    model.normalize.to(next(iter(module.parameters()), torch.zeros(())).device)
    _probe(model)
    return model
