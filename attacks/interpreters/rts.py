"""RTS: real-time saliency (Dabkowski & Gal 2017; ADV2 section 3.4, Eqn 8) as a trained masking network.

:class:`RTSNetwork` reads the multi-scale encoder features of the (frozen) classifier
(``model.forward_stages(x)``: no gradient into the classifier's parameters, differentiable w.r.t. ``x``):

* a bottleneck on the deepest features, then the **class selector**: the embedding of the class to explain,
  multiplied channel-wise into the bottleneck features; a **class head** (GAP -> linear) on the un-selected
  bottleneck features is the "encoder" output ``enc(x)`` used by the ADV2 encoder term;
* a small U-Net style decoder: upsample, concatenate a 1x1 projection of the next shallower stage (skip
  connection), two 3x3 convs, ... up to the shallowest stage, then bilinear up to the input resolution;
* a 2-channel output ``(a, b)`` and the mask ``m = (|a| + eps) / (|a| + |b| + 2 eps)`` in [0, 1].

It is trained on :func:`rts_objective` (ADV2 Eqn 8 / Eqn 15) by :class:`defend.aid.AIDModule`.

:class:`RTSInterpreter` wraps a trained network as an :class:`~attacks.interpreters.base.Interpreter`
(``name="rts"``, differentiable); :meth:`RTSInterpreter.attack_term` is the ADV2 term against RTS: map MSE plus
``enc_weight`` times the cross-entropy of the encoder's class head toward the target class (ADV2 section 3.4).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..state import eval_mode
from .base import Interpreter, to_input_size
from .mask import gaussian_blur, total_variation

__all__ = ["RTSNetwork", "RTSInterpreter", "RTSTerm", "rts_objective", "blend", "replacement_images"]


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


# --------------------------------------------------------------------------------------------- objective
def replacement_images(x: Tensor, kind: str, generator: torch.Generator | None = None, *, noise_std: float = 0.2,
                       blur_sigma: float | None = None, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """The "deleted" image ``r`` of the blend: ``"noise"`` (random colour per image + Gaussian noise, clipped)
    or ``"blur"`` (a strong Gaussian blur, sigma ``max(2, H / 6)`` by default). ``shard=(rank, world)``: ``x`` is
    rows ``rank::world`` of a global batch; the noise is drawn for the global batch and this shard's rows kept."""
    if kind == "blur":
        return gaussian_blur(x, blur_sigma or max(2.0, x.shape[-1] / 6))
    if kind == "noise":
        rank, world = shard
        n, c = x.shape[0] * world, x.shape[1]
        colour = torch.rand(n, c, 1, 1, generator=generator)[rank::world].to(x)
        noise = torch.randn((n, *x.shape[1:]), generator=generator)[rank::world].to(x) * noise_std
        return (colour + noise).clamp(0, 1)
    raise ValueError(f"replacement must be 'noise' or 'blur', got {kind!r}")


def blend(x: Tensor, m: Tensor, r: Tensor) -> Tensor:
    """``phi(x, m) = x * m + r * (1 - m)`` (``m`` is resampled to the input grid if needed)."""
    m = to_input_size(m, tuple(x.shape[-2:]))
    return x * m + r * (1 - m)


def rts_objective(model: nn.Module, x: Tensor, cls: Tensor, mask: Tensor, *, tv_weight: float = 1.0,
                  area_weight: float = 8.0, area_power: float = 0.3, destroyer_weight: float = 5.0,
                  destroyer_power: float = 0.3, preserver_weight: float = 1.0, tv_beta: float = 2.0,
                  replacement: str = "random", generator: torch.Generator | None = None,
                  noise_std: float = 0.2, blur_sigma: float | None = None,
                  fake: Tensor | None = None, shard: tuple[int, int] = (0, 1)) -> dict[str, Tensor]:
    """The RTS loss of ADV2 Eqn 8 / Eqn 15 per example, for masks ``mask`` of ``x`` and classes ``cls``::

        lambda1 * TV(m) + lambda2 * mean((m + 5e-4)^area_power) - log f_c(phi(x, m))
            + lambda3 * f_c(phi(x, 1 - m))^lambda4

    ``tv_weight`` = lambda1 (``TV`` = mean squared neighbour difference, exponent ``tv_beta``),
    ``area_weight`` = lambda2 (the reference's area loss ``mean((m + 5e-4)^0.3)``, weight ~8),
    ``destroyer_weight`` = lambda3, ``destroyer_power`` = lambda4; ``preserver_weight`` scales the
    ``-log f_c`` term (1 in Eqn 8). ``phi`` blends with ``replacement_images``: ``"noise"``, ``"blur"`` or
    ``"random"`` (one seeded coin per batch picks either). ``fake`` (bool ``[N]``) marks examples explained for a
    fake (wrong) class: only the smoothness and area terms apply to them, so their mask should be empty
    (Dabkowski & Gal's training of the class selector). The classifier must be frozen by the caller
    (gradients flow to the mask only). Returns a dict of per-example tensors: ``loss``, ``tv``, ``area``,
    ``preserver``, ``destroyer`` (un-weighted) and ``p_keep`` / ``p_del`` (class probability of the
    preserved and of the deleted image). ``shard=(rank, world)``: see :func:`replacement_images`.
    """
    if replacement == "random":
        replacement = "noise" if float(torch.rand((), generator=generator)) < 0.5 else "blur"
    r = replacement_images(x, replacement, generator, noise_std=noise_std, blur_sigma=blur_sigma, shard=shard).detach()
    n = x.shape[0]
    both = model(torch.cat([blend(x, mask, r), blend(x, 1 - mask, r)]))
    logp = F.log_softmax(both, 1)
    idx = cls.view(-1, 1).to(x.device)
    logp_keep = logp[:n].gather(1, idx).squeeze(1)
    p_del = logp[n:].gather(1, idx).squeeze(1).exp()
    tv = total_variation(mask, tv_beta)
    area = (mask + 5e-4).pow(area_power).flatten(1).mean(1)
    destroyer = p_del.clamp_min(1e-8).pow(destroyer_power)
    evidence = -preserver_weight * logp_keep + destroyer_weight * destroyer
    if fake is not None:
        evidence = torch.where(fake.to(x.device), torch.zeros_like(evidence), evidence)
    loss = tv_weight * tv + area_weight * area + evidence
    return {"loss": loss, "tv": tv, "area": area, "preserver": -logp_keep, "destroyer": destroyer,
            "p_keep": logp_keep.exp(), "p_del": p_del}


# --------------------------------------------------------------------------------------------- interpreter
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

    def maps_and_logits(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Masks (input grid) and the encoder's class logits in one pass, differentiable w.r.t. ``x``."""
        return self.network(model, x, target)

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            return self.network(model, x, target)[0]

    def normalise(self, m: Tensor) -> Tensor:
        return m.clamp(0, 1)  # already a mask in [0, 1]: no min-max stretching

    def attack_term(self):
        """The ADV2 term against this interpreter (map MSE + encoder CE), an ``attacks.terms.MapTerm``."""
        return _rts_term_class()(self, self.enc_weight)

    def __repr__(self) -> str:
        return f"RTSInterpreter(width={self.network.width}, enc_weight={self.enc_weight})"


@functools.cache
def _rts_term_class() -> type:
    """Build :class:`RTSTerm` on first use (``attacks.terms`` imports this package, so no top-level import)."""
    from ..terms import MapTerm, map_mse

    class RTSTerm(MapTerm):
        """ADV2 term against RTS (section 3.4): ``mean((g(x) - m_t)^2) + enc_weight * CE(enc(x), y_t)``."""

        def __init__(self, interpreter: RTSInterpreter, enc_weight: float = 0.1) -> None:
            super().__init__(interpreter)
            self.enc_weight = float(enc_weight)

        def loss_and_logits(self, model, x, y_t, m_t, state):
            m, enc_logits, logits = self.interpreter.network.forward_with_logits(model, x, y_t)
            loss = map_mse(m.clamp(0, 1), m_t) + self.enc_weight * F.cross_entropy(enc_logits, y_t, reduction="none")
            return loss, logits  # the classifier's logits from the shared encoder pass (no second forward)

        def loss(self, model, x, y_t, m_t, state):
            return self.loss_and_logits(model, x, y_t, m_t, state)[0]

    RTSTerm.__module__ = __name__
    return RTSTerm


def __getattr__(name: str) -> Any:
    if name == "RTSTerm":
        return _rts_term_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
