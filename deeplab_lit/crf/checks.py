"""Validation of the CRF's inputs: one clear line per problem, raised as CRFInputError (a ValueError)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from deeplab_lit.crf.errors import CRFInputError

BACKENDS = ("torch", "pydensecrf")
# How far sum_c probs may be from 1: float32 softmax outputs are within ~1e-6, half precision ~1e-3.
SUM_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
DEFAULT_SUM_TOLERANCE = 1e-3


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise CRFInputError(f"unknown CRF backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CRFInputError(f"CRF {what} must be a torch tensor or a numpy array, got {type(value).__name__}")


def check_inputs(probs: Any, images: Any) -> tuple[Tensor, Tensor]:
    """Returns (probs, images) as tensors, images moved to the probabilities' device.

    probs: float N x C x H x W, finite, in [0, 1], summing to 1 over C (a softmax output).
    images: uint8 N x H x W x 3 (RGB), same N, H, W.
    """
    probs = _as_tensor(probs, "probabilities")
    images = _as_tensor(images, "images")
    if probs.dim() != 4:
        raise CRFInputError(f"CRF probabilities must be N x C x H x W, got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise CRFInputError(f"CRF probabilities must be floating point (a softmax output), got {probs.dtype}")
    n, c, h, w = probs.shape
    if c < 1 or h < 1 or w < 1:
        raise CRFInputError(f"CRF probabilities have an empty dimension: shape {tuple(probs.shape)}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        hint = ""
        if images.dim() == 4 and images.shape[1] == 3:
            hint = " (channels first? pass images.permute(0, 2, 3, 1))"
        elif images.dtype != torch.uint8:
            hint = " (convert to uint8 0..255, unnormalised)"
        raise CRFInputError(
            f"CRF images must be uint8 RGB N x H x W x 3, got {images.dtype} of shape {tuple(images.shape)}{hint}")
    if tuple(images.shape[:3]) != (n, h, w):
        raise CRFInputError(
            f"CRF probabilities are N x C x H x W = {tuple(probs.shape)} but images are {tuple(images.shape)}: "
            "N, H and W must match (resize the probabilities to the image)")
    if n == 0:
        return probs, images.to(probs.device)
    finite = torch.isfinite(probs)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise CRFInputError(f"CRF probabilities contain NaN or inf ({bad} of {probs.numel()} values)")
    lowest, highest = float(probs.min()), float(probs.max())
    tolerance = SUM_TOLERANCE.get(probs.dtype, DEFAULT_SUM_TOLERANCE)
    if lowest < -tolerance or highest > 1 + tolerance:
        raise CRFInputError(
            f"CRF probabilities must lie in [0, 1], got values in [{lowest:.4g}, {highest:.4g}]: "
            "pass softmax(logits, dim=1), not logits")
    deviation = float((probs.sum(1, dtype=torch.float32) - 1).abs().max())
    if deviation > tolerance:
        raise CRFInputError(
            f"CRF probabilities do not sum to 1 over the class dimension (largest deviation {deviation:.3g} > "
            f"{tolerance:g}): pass softmax(logits, dim=1)")
    return probs, images.to(probs.device)
