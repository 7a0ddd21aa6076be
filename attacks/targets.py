"""Target maps m_t for ADV2 (paper section 5 Q1): the benign map, a random patch, another class's map. All seeded."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["random_patch_maps", "other_class_maps"]



def random_patch_maps(n: int, size: tuple[int, int], shape: str = "circle", area: tuple[float, float] = (0.05, 0.2),
                      generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Binary maps ``[n, 1, H, W]`` with one random circle or rotated rectangle each (seeded, batched)."""
    if shape not in ("circle", "rectangle"):
        raise ValueError(f"patch shape must be 'circle' or 'rectangle', got {shape!r}")
    h, w = size
    r = torch.rand(n, 6, generator=generator)
    frac = area[0] + (area[1] - area[0]) * r[:, 0]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    if shape == "circle":
        rad = torch.sqrt(frac * h * w / math.pi)
        cy = rad + (h - 2 * rad) * r[:, 1]
        cx = rad + (w - 2 * rad) * r[:, 2]
        inside = (ys - cy.view(-1, 1, 1)) ** 2 + (xs - cx.view(-1, 1, 1)) ** 2 <= rad.view(-1, 1, 1) ** 2
    else:
        aspect = 0.5 + 1.5 * r[:, 3]
        side_h = torch.sqrt(frac * h * w / aspect)
        side_w = side_h * aspect
        theta = math.pi * r[:, 4]
        half = 0.5 * torch.sqrt(side_h ** 2 + side_w ** 2)
        cy = half + (h - 2 * half).clamp_min(0) * r[:, 1]
        cx = half + (w - 2 * half).clamp_min(0) * r[:, 2]
        dy, dx = ys - cy.view(-1, 1, 1), xs - cx.view(-1, 1, 1)
        c, s = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
        u, v = c * dx + s * dy, -s * dx + c * dy
        inside = (u.abs() <= side_w.view(-1, 1, 1) / 2) & (v.abs() <= side_h.view(-1, 1, 1) / 2)
    return inside.float().unsqueeze(1).to(device)


def other_class_maps(maps: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each example, the map of a randomly chosen example of a *different* class in the same batch."""
    n = labels.shape[0]
    scores = torch.rand(n, n, generator=generator).to(labels.device)
    scores = scores.masked_fill(labels.view(-1, 1) == labels.view(1, -1), -1.0)
    if bool((scores.max(1).values < 0).any()):
        raise ValueError("other_class targets need at least two classes in the batch")
    return maps[scores.argmax(1)]
