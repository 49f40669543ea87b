"""DeepLab v1 (arXiv 1412.7062): the loss is computed at the network's output stride.

The Caffe implementation shrinks the ground truth by 8 ("Interp" shrink, nearest) to the size of the
fc8 score map instead of upsampling the scores; we do the same with nearest-neighbour interpolation
to the logits' exact size, so 255 stays 255 and no label is blended. The recipe (step schedule,
classifier x10, batch 20, ...) is data in experiments/base/v1.yaml.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deeplab_lit.modules.base import IGNORE_INDEX, SegmentationModule


def downsample_labels(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of int64 N x H x W labels to `size` (values, 255 included, kept)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()


def loss_at_logit_resolution(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, downsample_labels(masks, logits.shape[-2:]), ignore_index=IGNORE_INDEX)


class V1Module(SegmentationModule):
    def compute_loss(self, outputs: dict, masks: torch.Tensor) -> torch.Tensor:
        return loss_at_logit_resolution(outputs["logits"], masks)
