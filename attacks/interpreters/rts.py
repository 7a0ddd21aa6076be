"""RTS: real-time saliency (Dabkowski & Gal 2017; ADV2 section 3.4, Eqn 8) as a trained masking network.

:class:`RTSNetwork` reads the multi-scale encoder features of the (frozen) classifier
(``model.forward_stages(x)``: no gradient into the classifier's parameters, differentiable w.r.t. ``x``):

* a bottleneck on the deepest features, then the **class selector**: the embedding of the class to explain,
  multiplied channel-wise into the bottleneck features; a **class head** (GAP -> linear) on the un-selected
  bottleneck features is the "encoder" output ``enc(x)`` used by the ADV2 encoder term;
* a small U-Net style decoder: upsample, concatenate a 1x1 projection of the next shallower stage (skip
  connection), two 3x3 convs, ... up to the shallowest stage, then bilinear up to the input resolution;
* a 2-channel output ``(a, b)`` and the mask ``m = (|a| + eps) / (|a| + |b| + 2 eps)`` in [0, 1].

It is trained on :func:`attacks.interpreters.rts_objective.rts_objective` (ADV2 Eqn 8 / Eqn 15) by
:class:`defend.aid.AIDModule`.

:class:`RTSInterpreter` wraps a trained network as an :class:`~attacks.interpreters.base.Interpreter`
(``name="rts"``, differentiable); :meth:`RTSInterpreter.attack_term` is the ADV2 term against RTS: map MSE plus
``enc_weight`` times the cross-entropy of the encoder's class head toward the target class (ADV2 section 3.4).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..state import eval_mode
from ..terms import MapTerm, map_mse
from .base import INTERPRETERS, Interpreter, record_forward

__all__ = ["RTSNetwork", "RTSInterpreter", "RTSTerm"]


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, 1, k // 2)


class _UpBlock(nn.Module):
    """Upsample to the skip's grid, concatenate the projected skip, two 3x3 conv + ReLU."""

    def __init__(self, cin: int, skip_in: int, cout: int) -> None:
        super().__init__()
        self.skip = nn.Sequential(nn.Conv2d(skip_in, cout, 1), nn.ReLU())
        self.body = nn.Sequential(_conv(cin + cout, cout), nn.ReLU(), _conv(cout, cout), nn.ReLU())

    def forward(self, h: Tensor, skip: Tensor) -> Tensor:
        if h.shape[-2:] != skip.shape[-2:]:
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([h, self.skip(skip)], 1))


class RTSNetwork(nn.Module):
    """Masking model of RTS on a classifier's encoder features (the classifier is passed at call time).

    Args:
        stage_channels: channels of ``model.forward_stages(x)``, shallow to deep (``model.stage_channels``).
        num_classes: classes of the classifier (size of the selector embedding and of the class head).
        width: channels of the bottleneck and the decoder.
        eps: stabiliser of ``m = (|a| + eps) / (|a| + |b| + 2 eps)``.

    ``forward(model, x, cls)`` returns ``(mask [N, 1, H, W] in [0, 1] at the input resolution,
    encoder class logits [N, K])``. The RTS network has no normalisation layers, so train / eval mode
    give the same maps.
    """

    def __init__(self, stage_channels: Sequence[int], num_classes: int, width: int = 32, eps: float = 1e-4) -> None:
        super().__init__()
        stage_channels = [int(c) for c in stage_channels]
        if not stage_channels:
            raise ValueError("RTSNetwork needs at least one encoder stage (stage_channels is empty)")
        if num_classes < 2 or width < 1 or eps <= 0:
            raise ValueError(f"need num_classes >= 2, width >= 1 and eps > 0, got {num_classes}, {width}, {eps}")
        self.stage_channels, self.num_classes, self.width, self.eps = stage_channels, int(num_classes), int(width), float(eps)
        self.bottleneck = nn.Sequential(_conv(stage_channels[-1], width), nn.ReLU())
        self.selector = nn.Embedding(num_classes, width)
        nn.init.normal_(self.selector.weight, 1.0, 0.1)  # starts close to class-agnostic
        self.class_head = nn.Linear(width, num_classes)
        self.center = nn.Sequential(_conv(width, width), nn.ReLU())
        self.up = nn.ModuleList(_UpBlock(width, c, width) for c in reversed(stage_channels[:-1]))
        self.out = _conv(width, 2)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored with checkpoints)."""
        return {"stage_channels": list(self.stage_channels), "num_classes": self.num_classes, "width": self.width,
                "eps": self.eps}

    def check_model(self, model: nn.Module) -> None:
        """Fail clearly when ``model`` is not the kind of classifier this network was trained on."""
        chans = getattr(model, "stage_channels", None)
        if not hasattr(model, "forward_stages") or chans is None:
            raise ValueError(f"RTS needs a classifier exposing forward_stages() and stage_channels; "
                             f"{type(model).__name__} does not")
        if list(chans) != self.stage_channels or getattr(model, "num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"this RTS network was built for encoder stages {self.stage_channels} and "
                             f"{self.num_classes} classes; the classifier has {list(chans)} and "
                             f"{getattr(model, 'num_classes', '?')}")

    def encode(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        """Encoder features (the classifier's stages), computed in eval mode without gradients into the
        classifier's parameters (differentiable w.r.t. ``x``); the classifier's flags are restored."""
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            for p in params:
                p.requires_grad_(False)
            with eval_mode(model):
                return model.forward_stages(x)
        finally:
            for p in params:
                p.requires_grad_(True)

    def forward(self, model: nn.Module, x: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        self.check_model(model)
        return self.decode(self.encode(model, x), x, cls)

    def forward_with_logits(self, model: nn.Module, x: Tensor, cls: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(mask, encoder logits, classifier logits)`` from one encoder pass: the classifier's logits come from
        its last stage (``head(pool(stages[-1]))``) when it has that GAP head, else ``None``."""
        self.check_model(model)
        feats = self.encode(model, x)
        logits = None
        if isinstance(getattr(model, "head", None), nn.Module) and isinstance(getattr(model, "pool", None), nn.Module):
            logits = model.head(model.pool(feats[-1]))
        return (*self.decode(feats, x, cls), logits)

    def decode(self, feats: list[Tensor], x: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        """Masking network on encoder features: ``(mask at x's resolution, encoder class logits)``."""
        h = self.bottleneck(feats[-1])
        enc_logits = self.class_head(h.mean((2, 3)))
        h = self.center(h * self.selector(cls.to(x.device)).unsqueeze(-1).unsqueeze(-1))
        for block, skip in zip(self.up, reversed(feats[:-1])):
            h = block(h, skip)
        ab = self.out(h)
        if ab.shape[-2:] != x.shape[-2:]:
            ab = F.interpolate(ab, size=x.shape[-2:], mode="bilinear", align_corners=False)
        a, b = ab[:, :1].abs(), ab[:, 1:].abs()
        return (a + self.eps) / (a + b + 2 * self.eps), enc_logits


# --------------------------------------------------------------------------------------------- interpreter
@INTERPRETERS.register("rts")
class RTSInterpreter(Interpreter):
    """A trained :class:`RTSNetwork` as an interpreter (``g(model, x, target)`` in [0, 1]).

    Args:
        network: the trained masking network (required: RTS has no pretrained default). Train one with
            ``defend fit -c configs/aid/digits_rts.yaml`` and load it with ``defend.aid.load_rts`` (or name the
            checkpoint path in a ``defend`` config, which resolves it with :func:`defend.interpreters.build_interpreter`).
        enc_weight: weight of the encoder term in :meth:`attack_term` (ADV2: 0.1-0.2).
    """

    name = "rts"
    differentiable = True

    def __init__(self, network: RTSNetwork | str | os.PathLike | None = None, enc_weight: float = 0.1) -> None:
        if network is None:
            raise ValueError("interpreter 'rts' needs a trained RTS network: pass network=<RTSNetwork or checkpoint "
                             "path> (train one with `defend fit -c configs/aid/digits_rts.yaml`, load it with "
                             "defend.aid.load_rts)")
        if isinstance(network, (str, os.PathLike)):
            raise TypeError(f"network is a path ({network!s}): load it first with defend.aid.load_rts(path) "
                            "(the attacks package reads no checkpoint formats), or use "
                            "defend.interpreters.build_interpreter('rts', network=path)")
        if not isinstance(network, RTSNetwork):
            raise TypeError(f"network must be an RTSNetwork, got {type(network).__name__}")
        if enc_weight < 0:
            raise ValueError(f"enc_weight must be >= 0, got {enc_weight}")
        self.network, self.enc_weight = network, float(enc_weight)

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        """The mask; records the encoder's class logits and the classifier's logits of the same encoder pass."""
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            m, enc_logits, logits = self.network.forward_with_logits(model, x, target)
        record_forward(x, logits=logits, enc_logits=enc_logits)
        return m

    def normalise(self, m: Tensor) -> Tensor:
        return m.clamp(0, 1)  # already a mask in [0, 1]: no min-max stretching

    def attack_term(self) -> RTSTerm:
        """The ADV2 term against this interpreter (section 3.4): map MSE + ``enc_weight`` x encoder CE."""
        return RTSTerm(self, self.enc_weight)

    def __repr__(self) -> str:
        return f"RTSInterpreter(width={self.network.width}, enc_weight={self.enc_weight})"


class RTSTerm(MapTerm):
    """ADV2 term against RTS (section 3.4): ``mean((g(x) - m_t)^2) + enc_weight * CE(enc(x), y_t)`` with ``g`` the
    interpreter's :meth:`~RTSInterpreter.explain` (a subclass's own map); the encoder and classifier logits come from
    the shared encoder pass (no second forward) when the map goes through RTS's own."""

    def __init__(self, interpreter: RTSInterpreter, enc_weight: float = 0.1) -> None:
        super().__init__(interpreter)
        self.enc_weight = float(enc_weight)

    def networks(self) -> list[nn.Module]:
        return [self.interpreter.network]

    def loss_and_logits(self, model, x, y_t, m_t, state):
        state["map"], recorded = self.interpreter.recorded_map(model, x, y_t)
        enc_logits = recorded.get("enc_logits")
        if enc_logits is None:  # a subclass's explain that does not run RTS's pass on x: one extra encoder pass
            enc_logits = self.interpreter.network.forward_with_logits(model, x, y_t)[1]
        loss = map_mse(state["map"], m_t) + self.enc_weight * F.cross_entropy(enc_logits, y_t, reduction="none")
        return loss, recorded.get("logits")
