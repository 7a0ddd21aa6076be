"""The ``certify`` section of ``defend evaluate``: randomized-smoothing certificates of the prediction and of each
interpreter's sparsified map (:mod:`attacks.certify`, docs/certify.md), as one :class:`~defend.rows.CertificationRow`
per (interpreter, radius) of ``results.certification``.

Inputs: the first ``certify.n_images`` test inputs (all of them where the test split has fewer; the rows' ``n`` says
how many), correctly classified or not, as Cohen et al. report certified accuracy: a wrong or abstained prediction is
not certified. They are certified in chunks of the battery's ``batch_size`` (each forward pass holds
``samples_per_batch`` noisy copies of a chunk), in order, every certificate drawing its noise from its own generator
seeded with the battery's seed (the prediction's, then each interpreter's map), continued from chunk to chunk. The
map of an input is certified for its certified class, or for the base prediction where CERTIFY abstains (the map is
still measured; the input is then not dual-certified).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attacks.certify import MapCertificate, PredictionCertificate, certify_map, certify_prediction, dual_radius
from attacks.state import frozen

from .. import stats
from ..inputs import take_split
from ..rows import CertificationRow, Fig
from .battery import Battery, CertifyBattery
from .system import System, interpreters_for

__all__ = ["certification_rows", "certify_names", "certify_inputs", "linf_equivalent"]


def certify_names(system: System, c: CertifyBattery) -> list[str]:
    """The interpreters whose maps are certified: ``certify.interpreters``, and ``rts`` when the system has one and
    ``certify.with_rts``."""
    return list(c.interpreters) + (["rts"] if system.rts is not None and c.with_rts else [])


def certify_inputs(system: System, c: CertifyBattery) -> dict[str, Tensor]:
    """The first ``certify.n_images`` test inputs (all where the split has fewer), correctly classified or not."""
    n = min(int(c.n_images), len(system.data.test_dataset))
    return take_split(system.data, "test", n)


def linf_equivalent(radius: float, shape: tuple[int, ...]) -> float:
    """The L-inf radius an L2 radius covers on images of ``shape`` ``(C, H, W)``: ``r / sqrt(C*H*W)`` (an L-inf
    ball of eps lies inside the L2 ball of eps * sqrt(d))."""
    return float(radius) / math.sqrt(math.prod(int(v) for v in shape))


def _chunked(x: Tensor, size: int, run: Callable[[Tensor, slice], Any]) -> tuple[list[Any], float]:
    """``run(chunk, where)`` on each chunk of ``size`` inputs, in order; the results and the seconds taken."""
    start = time.perf_counter()
    out = [run(x[i:i + size], slice(i, i + size)) for i in range(0, x.shape[0], size)]
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return out, time.perf_counter() - start


def _generator(x: Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=x.device).manual_seed(seed)


def _predictions(model: Any, x: Tensor, c: CertifyBattery, seed: int, size: int) -> tuple[PredictionCertificate, float]:
    """CERTIFY on every input (chunks of ``size``, one generator seeded ``seed``) and the seconds it took."""
    gen = _generator(x, seed)
    parts, seconds = _chunked(x, size, lambda xc, _: certify_prediction(
        model, xc, float(c.sigma), int(c.n0), int(c.n), float(c.alpha),
        samples_per_batch=int(c.samples_per_batch), generator=gen))
    cat = [torch.cat([getattr(p, f) for p in parts]) for f in ("prediction", "radius", "p_lower", "counts")]
    return PredictionCertificate(*cat), seconds


def _maps(model: Any, interp: Any, x: Tensor, target: Tensor, c: CertifyBattery, seed: int,
          size: int) -> tuple[MapCertificate, float]:
    """The map certificate of ``target`` on every input (chunks of ``size``, one generator seeded ``seed``)."""
    gen = _generator(x, seed)
    parts, seconds = _chunked(x, size, lambda xc, where: certify_map(
        model, interp, xc, target[where], float(c.sigma), int(c.n0), int(c.n), float(c.alpha), float(c.k_percent),
        correction=str(c.correction), samples_per_batch=int(c.samples_per_batch), generator=gen))
    cat = [torch.cat([getattr(p, f) for p in parts]) for f in ("in_topk", "certified", "radius", "p_lower")]
    return MapCertificate(*cat, str(c.correction)), seconds


def _forward_seconds(model: Any, x: Tensor, repeats: int = 3) -> float:
    """The seconds of one batched forward pass of ``x`` (the fastest of ``repeats`` after a warm-up)."""
    best = math.inf
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            best = best if i == 0 else min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _map_figures(maps: MapCertificate, r: float, share: float, k: int) -> dict[str, np.ndarray]:
    """Per input at radius ``r``: the share of its selected top-k pixels certified at >= r, those pixels over ``k``,
    and whether at least ``share`` of them are (the map is certified at r)."""
    top = maps.in_topk.flatten(1)
    held = (top & maps.certified.flatten(1) & (maps.radius.flatten(1) >= r)).sum(1).double()
    size = top.sum(1).double()
    frac = torch.where(size > 0, held / size.clamp_min(1), torch.zeros_like(held))
    need = torch.ceil(size * share - 1e-9).clamp_min(1)
    return {"share": frac.cpu().numpy(), "overlap": (held / k).cpu().numpy(),
            "certified": ((size > 0) & (held >= need)).cpu().numpy()}


def certification_rows(system: System, battery: Battery) -> list[dict[str, Any]]:
    """The ``results.certification`` rows: per interpreter (:func:`certify_names`) and radius of ``certify.radii``,
    the certified, map-certified and dual-certified accuracy (Wilson), the certified top-k share and overlap
    (bootstrap), and the cost per input (module docstring for the inputs and the seeds)."""
    c, seed, size = battery.certify, int(battery.seed), int(battery.batch_size)
    if c is None:
        return []
    model = system.classifier
    device = next(model.parameters()).device
    data = certify_inputs(system, c)
    x, y = data["image"].to(device), data["label"].to(device)
    with frozen(model), torch.no_grad():
        pred, pred_seconds = _predictions(model, x, c, seed, size)
        base = torch.cat([model(x[i:i + size]).argmax(1) for i in range(0, x.shape[0], size)])
        forward = _forward_seconds(model, x)
    target = torch.where(pred.prediction >= 0, pred.prediction, base)
    correct = (pred.prediction == y).cpu().numpy()
    rows = []
    for name, interp in interpreters_for(system, certify_names(system, c)).items():
        maps, map_seconds = _maps(model, interp, x, target, c, seed, size)
        per_input = (pred_seconds + map_seconds) / x.shape[0]
        common = _common(c, seed, int(x.shape[0]), int((pred.prediction < 0).sum()), per_input,
                         per_input / (forward / x.shape[0]))
        k = max(1, round(float(c.k_percent) / 100 * maps.in_topk[0].numel()))
        rows += [_row(name, float(r), pred, maps, correct, c, k, seed, tuple(x.shape[1:]), common)
                 for r in c.radii]
    return rows


def _common(c: CertifyBattery, seed: int, n: int, abstained: int, seconds: float, ratio: float) -> dict[str, Any]:
    """The fields every row of one interpreter shares: the settings, n and the cost."""
    return {"n": n, "abstained": abstained, "sigma": float(c.sigma), "n0": int(c.n0), "n_noise": int(c.n),
            "alpha": float(c.alpha), "k_percent": float(c.k_percent), "correction": str(c.correction),
            "share": float(c.share), "samples_per_batch": int(c.samples_per_batch),
            "forward_passes_per_input": 2 * (int(c.n0) + int(c.n)), "seconds_per_input": seconds,
            "forward_ratio": ratio, "seed": seed}


def _row(name: str, r: float, pred: PredictionCertificate, maps: MapCertificate, correct: np.ndarray,
         c: CertifyBattery, k: int, seed: int, shape: tuple[int, ...], common: dict[str, Any]) -> dict[str, Any]:
    """One :class:`CertificationRow` at radius ``r``."""
    radius = pred.radius.cpu().numpy()
    dual = dual_radius(pred, maps, float(c.share)).cpu().numpy()
    fig = _map_figures(maps, r, float(c.share), k)
    return CertificationRow(
        interpreter=name, radius=r, linf_eps=linf_equivalent(r, shape),
        certified_accuracy=Fig.of(stats.proportion(correct & (radius >= r))),
        map_certified=Fig.of(stats.proportion(fig["certified"])),
        dual_certified_accuracy=Fig.of(stats.proportion(correct & (dual > 0) & (dual >= r))),
        map_certified_share=Fig.of(stats.bootstrap_mean(fig["share"], seed)),
        topk_overlap=Fig.of(stats.bootstrap_mean(fig["overlap"], seed)), **common).to_dict()
