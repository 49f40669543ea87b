"""DeepLab v2 ResNet heads: a 1x1 classifier, or 3x3 atrous classifiers whose logits are summed.

`classifier`: one 1x1 conv to the classes (v2 Table 4 baseline; also the v3 cascaded-block rows,
whose block7 output goes straight to a classifier).
`atrous_classifier`: one 3x3 conv (dilation r, padding r, with bias) to the classes per rate, logits
summed (v2 Sec. 3.1 and its Caffe ResNet prototxt): LargeFOV = [12], ASPP-L = [6, 12, 18, 24].
These rates are absolute: v2 defines them at output stride 8 and they are not rescaled when the
output stride is switched (only the v3 `aspp` head rescales).
"""
from __future__ import annotations

import torch
from torch import nn

from deeplab_lit.models.heads.fc import init_classifier


class ClassifierHead(nn.Module):
    pretrained_prefixes = ()

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)
        init_classifier(self.classifier)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(features["out"])

    def atrous_rates(self) -> list[int]:
        return []


class AtrousClassifierHead(nn.Module):
    pretrained_prefixes = ()

    def __init__(self, in_channels: int, num_classes: int, *, rates: list[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            init_classifier(conv)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features["out"]
        logits = [conv(x) for conv in self.branches]
        return torch.stack(logits).sum(dim=0) if len(logits) > 1 else logits[0]

    def atrous_rates(self) -> list[int]:
        return [conv.dilation[0] for conv in self.branches]
