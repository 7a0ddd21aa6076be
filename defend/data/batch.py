"""The batch contract shared by every data module.

Every dataset item is a dict::

    {"image": FloatTensor[3, H, W] in [0, 1] (on the uint8 grid k/255),
     "label": int64 scalar tensor,
     "index": int64 scalar tensor (position of the item in its dataset),
     "mask":  FloatTensor[1, H, W] with values in {0, 1}}   # only where available

After default collation a batch has the same keys with a leading batch dimension.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["IMAGE", "LABEL", "INDEX", "MASK", "quantize", "check_batch"]

IMAGE = "image"
LABEL = "label"
INDEX = "index"
MASK = "mask"


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and snap values onto the uint8 grid (k / 255)."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def check_batch(batch: Mapping[str, torch.Tensor], num_classes: int) -> None:
    """Validate a collated batch against the contract; raise ``ValueError`` naming the problem."""
    for key in (IMAGE, LABEL):
        if key not in batch:
            raise ValueError(f"batch is missing the '{key}' key (keys: {sorted(batch)})")
    image, label = batch[IMAGE], batch[LABEL]
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a 4-D tensor [N, C, H, W], got shape {shape}")
    if not torch.is_floating_point(image):
        raise ValueError(f"image must be a floating point tensor, got dtype {image.dtype}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or Inf values")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"image values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    if not isinstance(label, torch.Tensor) or label.dim() != 1 or label.shape[0] != image.shape[0]:
        shape = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
        raise ValueError(f"label must be a 1-D tensor of length N={image.shape[0]}, got shape {shape}")
    if torch.is_floating_point(label) or label.dtype == torch.bool:
        raise ValueError(f"label must be an integer tensor, got dtype {label.dtype}")
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise ValueError(
            f"labels out of range: expected values in [0, {num_classes}), "
            f"got [{int(label.min())}, {int(label.max())}]"
        )
    if MASK in batch:
        mask = batch[MASK]
        n, _, h, w = image.shape
        if mask.dim() != 4 or tuple(mask.shape) != (n, 1, h, w):
            raise ValueError(f"mask must have shape [{n}, 1, {h}, {w}], got {tuple(mask.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask values must be 0 or 1")
