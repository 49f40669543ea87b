"""DeepLab v1 (arXiv 1412.7062): the loss is computed at the network's output stride.

The Caffe implementation shrinks the ground truth by 8 (the "Interp" layer with shrink_factor 8) to
the size of the fc8 score map instead of upsampling the scores. That layer maps output index i to input
position i * (H - 1) / (h - 1) (corners aligned), which for the 321 crop (41 x 41 scores) samples
exactly every 8th label. We sample the label at the nearest such position, so values (255 included)
are kept and no label is blended, and crops of size 8k + 1 give exactly `mask[::8, ::8]`. The recipe (step schedule,
classifier x10, batch 20, ...) is data in experiments/base/v1.yaml.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deeplab_lit.modules.base import IGNORE_INDEX, SegmentationModule


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


class V1Module(SegmentationModule):
    def compute_loss(self, outputs: dict, masks: torch.Tensor) -> torch.Tensor:
        return loss_at_logit_resolution(outputs["logits"], masks)
