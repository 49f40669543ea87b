"""DeepLab v2 (arXiv 1606.00915): the v1 loss, plus one term per scale of the MSC input pyramid.

With MSC the network returns each scale's logits (`scale_logits`) besides the max-fused map
(`logits`); as in the Caffe prototxt the loss sums the cross-entropy of every scale and of the fused
output, each against the ground truth shrunk (nearest) to that map's size. The recipe (poly, new
layers x10 and biases x20 without weight decay, frozen BatchNorm for ResNet) is data in
experiments/base/v2_*.yaml.
"""
from __future__ import annotations

import torch

from deeplab_lit.modules.v1 import loss_at_logit_resolution
from deeplab_lit.modules.base import SegmentationModule


class V2Module(SegmentationModule):
    def loss_terms(self, outputs: dict, masks: torch.Tensor) -> list[torch.Tensor]:
        maps = [outputs["logits"], *outputs.get("scale_logits", [])]
        return [loss_at_logit_resolution(logits, masks) for logits in maps]

    def compute_loss(self, outputs: dict, masks: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.loss_terms(outputs, masks)).sum()
