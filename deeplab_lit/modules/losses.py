"""Where the loss is computed (`optim.loss_at`), one function for every generation.

- "logits" (v1, v2; Caffe): the ground truth is shrunk to the size of the logits instead of
  upsampling them. Caffe's "Interp" label-shrink layer maps output index i to input position
  i * (H - 1) / (h - 1) (corners aligned), which for the 321 crop (41 x 41 scores) samples exactly
  every 8th label; we take the label at the nearest such position, so values (255 included) are kept
  and no label is blended, and crops of size 8k + 1 give exactly `mask[::8, ::8]`. With the v2 MSC
  pyramid the loss sums the cross-entropy of every scale's logits and of the max-fused logits, each
  against the ground truth shrunk to that map's size, as the v2 MSC prototxts do.
- "input" (v3, v3+; v3 Sec. 4.1): "we upsample the final logits instead of downsampling the ground
  truth": cross-entropy of the logits upsampled (the model's align_corners) to the full-resolution ground truth (v3 Table 8 measures
  the difference). MSC scale terms, if any, use each scale's logits upsampled the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deeplab_lit.models.resize import resize_bilinear

IGNORE_INDEX = 255


def downsample_labels(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels N x H x W sampled at the corner-aligned positions of a `size` grid (Caffe's label shrink)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    rows = _aligned_positions(masks.shape[-2], size[0], masks.device)
    cols = _aligned_positions(masks.shape[-1], size[1], masks.device)
    return masks[:, rows][:, :, cols]


def _aligned_positions(length: int, count: int, device) -> torch.Tensor:
    if count == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.round(torch.arange(count, device=device) * ((length - 1) / (count - 1))).long()


def loss_at_logit_resolution(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, downsample_labels(masks, logits.shape[-2:]), ignore_index=IGNORE_INDEX)


def loss_at_input_resolution(logits: torch.Tensor, masks: torch.Tensor, align_corners: bool) -> torch.Tensor:
    logits = resize_bilinear(logits, masks.shape[-2:], align_corners)
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


def loss_terms(outputs: dict, masks: torch.Tensor, loss_at: str, align_corners: bool) -> list[torch.Tensor]:
    """One term for the network's output and one per MSC scale (training with `msc_scales` only)."""
    if loss_at == "logits":
        maps = [outputs["logits"], *outputs.get("scale_logits", [])]
        return [loss_at_logit_resolution(logits, masks) for logits in maps]
    return [loss_at_input_resolution(outputs["out"], masks, align_corners),
            *(loss_at_input_resolution(logits, masks, align_corners) for logits in outputs.get("scale_logits", []))]
