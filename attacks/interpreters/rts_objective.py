"""The RTS training objective (Dabkowski & Gal 2017; ADV2 Eqn 8 / Eqn 15): what :class:`defend.aid.AIDModule`
minimises. The network and the interpreter are in :mod:`attacks.interpreters.rts`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..maps import resize_map
from .mask import gaussian_blur, total_variation

__all__ = ["rts_objective", "blend", "replacement_images"]


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
    m = resize_map(m, tuple(x.shape[-2:]))
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


