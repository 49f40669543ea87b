"""The zoo's one bilinear resize.

`align_corners` is the model's `model.align_corners` (default true): the papers' code aligns corners in
every bilinear resize, Caffe's Interp layer (v1, v2: deeplab-public interp.cpp maps output i to input
i * (H - 1) / (h - 1)) and TF DeepLab (v3, v3+: every `tf.image.resize_bilinear(..., align_corners=True)`
in model.py and train_utils.py), which is why their crops are 8k + 1 (321, 513). False gives PyTorch's
(and torchvision's) half-pixel convention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resize_bilinear(x: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    if not torch.jit.is_tracing() and tuple(x.shape[-2:]) == tuple(size):  # traced sizes are tensors
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def scaled_length(n: int, scale: float, align_corners: bool) -> int:
    """An image side resized by `scale` for multi-scale evaluation: on the corner-aligned grid TF's
    `scale_dimension`, int((n - 1) * s + 1) (513 -> 385 at 0.75); otherwise round(n * s)."""
    if align_corners:
        return max(1, int((n - 1) * scale + 1 + 1e-9))
    return max(1, int(math.floor(n * scale + 0.5)))
