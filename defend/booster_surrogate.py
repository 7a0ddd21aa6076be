"""A differentiable copy of a detector's booster, for attacks that adapt to the detector.

Gradient boosting has no input gradient (its trees are piecewise constant), so an attacker who knows the detector
needs a surrogate of it (Athalye et al. 2018, "Obfuscated gradients", BPDA; Tramer et al. 2020, section 5: attack
the function the defence actually computes). The trunk's cross-entropy head is one, but the booster is trained on
other features (every stage's GAP) and need not agree with it. :class:`BoosterSurrogate` distils the booster
instead: a ridge regression (scikit-learn's ``RidgeCV``) from the standardised GAP features to the booster's
log-odds on the detector's own training maps. Read through the trunk, it is differentiable in the maps.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["BoosterSurrogate", "fit_booster_surrogate", "surrogate_agreement", "SURROGATE_ALPHAS"]

#: ridge penalties ``RidgeCV`` chooses from (efficient leave-one-out), on standardised features
SURROGATE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))


class BoosterSurrogate(nn.Module):
    """``z(f) = w . (f - mean) / scale + bias``: the booster's log-odds (margin) as a linear function of the GAP
    features ``f`` (buffers only: nothing to train, everything travels in ``state_dict``)."""

    def __init__(self, mean: Tensor, scale: Tensor, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        for name, value in (("mean", mean), ("scale", scale), ("weight", weight), ("bias", bias.reshape(()))):
            self.register_buffer(name, value.detach().to(torch.float32).clone())
        if not self.mean.shape == self.scale.shape == self.weight.shape or self.mean.dim() != 1:
            raise ValueError(f"surrogate buffers disagree: mean {tuple(self.mean.shape)}, scale "
                             f"{tuple(self.scale.shape)}, weight {tuple(self.weight.shape)}")

    @classmethod
    def empty(cls, features: int) -> BoosterSurrogate:
        """A placeholder of the right shape (its buffers are then loaded from a saved state)."""
        z = torch.zeros(features)
        return cls(z, torch.ones(features), z, torch.zeros(()))

    def forward(self, features: Tensor) -> Tensor:
        """Log-odds ``[N]`` of the features ``[N, F]``."""
        return ((features - self.mean) / self.scale) @ self.weight + self.bias


def fit_booster_surrogate(features: np.ndarray, margin: np.ndarray) -> tuple[BoosterSurrogate, dict[str, Any]]:
    """Fit :class:`BoosterSurrogate` to the booster's ``margin`` on ``features`` (the rows it was trained on).

    Returns the surrogate and its fit: ``surrogate_r2`` (on those rows), ``surrogate_sign_agreement`` (share of rows
    on which the surrogate and the booster take the same side of the 0.5 threshold) and ``surrogate_alpha``."""
    from sklearn.linear_model import RidgeCV

    f = np.asarray(features, dtype=np.float64)
    z = np.asarray(margin, dtype=np.float64).reshape(-1)
    if f.ndim != 2 or f.shape[0] != z.shape[0] or f.shape[0] < 2:
        raise ValueError(f"need features [N, F] and margins [N] with N >= 2, got {f.shape} and {z.shape}")
    mean, scale = f.mean(0), f.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)  # constant features: weight fitted on zeros, harmless
    std = (f - mean) / scale
    ridge = RidgeCV(alphas=SURROGATE_ALPHAS).fit(std, z)
    fit = surrogate_agreement(z, ridge.predict(std))
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    head = BoosterSurrogate(t(mean), t(scale), t(ridge.coef_), t(ridge.intercept_))
    return head, {"surrogate_r2": fit["r2"], "surrogate_sign_agreement": fit["sign_agreement"],
                  "surrogate_alpha": float(ridge.alpha_)}


def surrogate_agreement(margin: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """How well ``predicted`` log-odds (the surrogate's) reproduce the booster's ``margin`` on the same maps: ``r2``
    (scikit-learn's ``r2_score``: 1 - residual / total sum of squares), ``sign_agreement`` (share of maps on which
    both take the same side of the 0.5 threshold), ``spearman`` (rank correlation, ``None`` for a constant input)
    and ``n``. Fewer than two maps: ``None`` figures."""
    from scipy.stats import spearmanr
    from sklearn.metrics import r2_score

    z = np.asarray(margin, dtype=np.float64).reshape(-1)
    s = np.asarray(predicted, dtype=np.float64).reshape(-1)
    if z.shape != s.shape:
        raise ValueError(f"margins and predictions differ in length: {z.size} and {s.size}")
    if z.size < 2:
        return {"r2": None, "sign_agreement": None, "spearman": None, "n": int(z.size)}
    rho = float(spearmanr(z, s).statistic) if z.std() > 0 and s.std() > 0 else None
    return {"r2": float(r2_score(z, s)), "sign_agreement": float(((s > 0) == (z > 0)).mean()), "spearman": rho,
            "n": int(z.size)}
