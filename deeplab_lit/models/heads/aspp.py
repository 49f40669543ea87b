"""DeepLab v3 Atrous Spatial Pyramid Pooling (v3 Sec. 3.3) and the v3 `aspp` head.

ASPP = a 1x1 conv branch, one 3x3 atrous conv branch per rate, and (if `image_pooling`) an image
pooling branch, each 256 channels with BatchNorm and ReLU (convs without bias); the branches are
concatenated and projected by a 1x1 conv 256 + BatchNorm + ReLU. The head adds a 1x1 classifier.

Separable (`separable=True`, v3+ Sec. 3.1 "atrous separable convolution", Table 5 "SC"): each 3x3 atrous
branch becomes TF DeepLab's `_split_separable_conv2d` (model.py, used when `aspp_with_separable_conv`):
depthwise 3x3 at the branch's rate -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU, no biases. The 1x1
branch, the image pooling branch and the projection stay ordinary convs, as in TF's
`_extract_features`. TF initialises the depthwise/pointwise weights with truncated normals of std
0.33 / 0.06; we use the He init of every new hidden layer (`init_hidden`).

Choices where the paper is silent:
- Dropout after the projection: p = `aspp_dropout` (default 0.1), as TF-DeepLab's official code
  (keep_prob 0.9); torchvision uses 0.5. The v3 paper mentions none.
- Rates are given for output stride 16 (v3 Sec. 3.3) and scale with it: effective rate =
  rate * 16 / output_stride (x2 at OS 8, /2 at OS 32, floored, at least 1), unless
  `aspp_rates_absolute`. `set_output_stride` changes only the 3x3 branches' dilation and padding.
- Image pooling with one image: BatchNorm over a N x 256 x 1 x 1 map has a single value per channel
  when N = 1, which PyTorch rejects in training. When the pooled map holds one value per channel
  (N * H * W == 1) in training, this branch normalises with its running statistics (as in eval
  mode) while still learning its scale and shift; its running statistics are then not updated by that
  step. Training and evaluation thus normalise that branch identically. Batches of 2 or more use
  ordinary batch statistics, and a SyncBatchNorm in a multi-process group gathers statistics across
  processes as usual.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deeplab_lit.models.heads.fc import init_classifier, init_hidden

REFERENCE_STRIDE = 16  # v3 gives ASPP rates for output stride 16


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, rate: int = 1) -> nn.Sequential:
    padding = rate * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=rate, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def separable_conv_bn_relu(in_channels: int, out_channels: int, rate: int = 1) -> nn.Sequential:
    """TF DeepLab's `_split_separable_conv2d`: depthwise 3x3 (rate) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU.

    Index 0 is the depthwise conv, so output-stride switching (its dilation) works as for `conv_bn_relu`."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=rate, dilation=rate, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _sync_across_processes(bn: nn.Module) -> bool:
    return (isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


class ImagePooling(nn.Module):
    """Global average pooling -> 1x1 conv -> BN -> ReLU -> bilinear upsampling to the input size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        single_value = y.shape[0] * y.shape[2] * y.shape[3] == 1
        if self.training and single_value and not _sync_across_processes(self.bn):
            bn = self.bn
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             training=False, eps=bn.eps)
        else:
            y = self.bn(y)
        return F.interpolate(self.relu(y), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """v3 ASPP producing `channels` features (no classifier); used by the v3 head and the v3+ encoder."""

    def __init__(self, in_channels: int, *, rates: list[int], channels: int = 256,
                 image_pooling: bool = True, rates_absolute: bool = False, dropout: float = 0.1,
                 output_stride: int = REFERENCE_STRIDE, separable: bool = False):
        super().__init__()
        self.rates = [int(r) for r in rates]
        self.rates_absolute = rates_absolute
        self.separable = separable
        atrous = separable_conv_bn_relu if separable else (lambda i, o, r: conv_bn_relu(i, o, 3, r))
        branches = [conv_bn_relu(in_channels, channels, 1)]
        branches += [atrous(in_channels, channels, rate) for rate in self.rates]
        if image_pooling:
            branches.append(ImagePooling(in_channels, channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(channels * len(branches), channels, 1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True), nn.Dropout(dropout))
        init_hidden(self)
        self.set_output_stride(output_stride)

    def effective_rates(self, output_stride: int) -> list[int]:
        if self.rates_absolute:
            return list(self.rates)
        return [max(1, r * REFERENCE_STRIDE // output_stride) for r in self.rates]

    def set_output_stride(self, output_stride: int) -> None:
        for branch, rate in zip(self.branches[1:1 + len(self.rates)], self.effective_rates(output_stride)):
            branch[0].dilation = (rate, rate)
            branch[0].padding = (rate, rate)

    def atrous_rates(self) -> list[int]:
        return [branch[0].dilation[0] for branch in self.branches[1:1 + len(self.rates)]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class ASPPEncoderHead(nn.Module):
    """A head built on an ASPP (v3, v3+): switching the output stride and reporting rates is the ASPP's."""

    pretrained_prefixes = ()

    def __init__(self, aspp: ASPP):
        super().__init__()
        self.aspp = aspp

    def set_output_stride(self, output_stride: int) -> None:
        self.aspp.set_output_stride(output_stride)

    def atrous_rates(self) -> list[int]:
        return self.aspp.atrous_rates()


class ASPPHead(ASPPEncoderHead):
    """v3 head: ASPP on `features["out"]` then a 1x1 classifier."""

    def __init__(self, aspp: ASPP, num_classes: int):
        super().__init__(aspp)
        channels = aspp.project[0].out_channels
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_classifier(self.classifier)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.aspp(features["out"]))
