"""DeepLab v3+ decoder head (v3+ Sec. 3.1, Fig. 2; the variants of Table 2).

encoder = v3 ASPP (without classifier) on `features["out"]`. The decoder takes one or more low-level
features, coarse to fine (`model.decoder_features`; empty = the backbone's stride-4 feature, the paper's
model: ResNet `layer1` = "Conv2", Xception TF's entry-flow end point, timm `stride4`). For each: the
low-level map -> 1x1 conv `decoder_channels` (48) + BN + ReLU; the running decoder map is upsampled
bilinearly (the model's `align_corners`, TF's True) to that map's size (x4 at OS 16 for layer1; to the exact size, so odd
inputs work), concatenated [decoder, low-level] and refined by `decoder_convs` convs of `decoder_width`
channels and kernel `decoder_kernel` (BN, ReLU, no bias). Then a 1x1 classifier.

v3+ Table 2 rows: [3x3, 256] x1, x2 (the model), x3; [3x3, 128]; [1x1, 256]; and Conv2 + Conv3
(`decoder_features: [layer2, layer1]`: "the decoder feature map are gradually upsampled by 2,
concatenated with Conv3 first and then Conv2, and each will be refined by the [3x3, 256] operation";
each stage gets its own 48-channel projection and `decoder_convs` refinement convs).
Logits are at the stride of the finest feature (4 for the paper's) whatever the encoder's output stride;
the wrapper upsamples them to the input.
With `separable` (v3+ Table 5 "SC"; TF `decoder_use_separable_conv`) each 3x3 refinement conv is TF's
`_split_separable_conv2d` (depthwise 3x3 -> BN -> ReLU -> pointwise -> BN -> ReLU, `heads/aspp.py`);
the 1x1 projection of the low-level feature stays an ordinary conv, as in TF's `refine_by_decoder`.
With ResNet-101 (v3+ Tables 1-3) they are ordinary convs. TF-DeepLab's decoder has no dropout,
nor has this one.
"""
from __future__ import annotations

import torch
from torch import nn

from deeplab_lit.models.heads.aspp import ASPP, ASPPEncoderHead, conv_bn_relu, separable_conv_bn_relu
from deeplab_lit.models.heads.fc import init_classifier, init_hidden
from deeplab_lit.models.resize import resize_bilinear


def refine(in_channels: int, convs: int, width: int, kernel: int, separable: bool) -> tuple[nn.Sequential, int]:
    layers, channels = [], in_channels
    for _ in range(convs):
        layers.append(separable_conv_bn_relu(channels, width) if separable
                      else conv_bn_relu(channels, width, kernel))
        channels = width
    return nn.Sequential(*layers), channels


class DecoderStage(nn.Module):
    """A coarser decoder step (Conv3 of the Conv2 + Conv3 variant): project, upsample, concatenate, refine."""

    def __init__(self, in_channels: int, low_level_channels: int, *, projection: int, convs: int, width: int,
                 kernel: int, separable: bool, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        self.low_level = conv_bn_relu(low_level_channels, projection, 1)
        self.fuse, self.out_channels = refine(in_channels + projection, convs, width, kernel, separable)

    def forward(self, decoder: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low = self.low_level(low_level)
        decoder = resize_bilinear(decoder, low.shape[-2:], self.align_corners)
        return self.fuse(torch.cat([decoder, low], dim=1))


class DecoderHead(ASPPEncoderHead):
    """`low_level` / `fuse` act on the finest feature; `coarse` holds the steps on coarser features before
    it, if any. `features` = [(name, channels), ...] coarse to fine; `logits_stride` = the finest's stride."""

    def __init__(self, aspp: ASPP, num_classes: int, *, features: list[tuple[str, int]], logits_stride: int,
                 decoder_channels: int = 48, decoder_convs: int = 2, decoder_width: int = 256,
                 decoder_kernel: int = 3, separable: bool = False, align_corners: bool = True):
        super().__init__(aspp)
        self.align_corners = align_corners
        *coarse, (self.low_level_key, finest_channels) = features
        self.coarse_features = [name for name, _ in coarse]
        self.logits_stride = logits_stride
        refinement = dict(convs=decoder_convs, width=decoder_width, kernel=decoder_kernel, separable=separable)
        channels, stages = aspp.project[0].out_channels, []
        for _, low_level_channels in coarse:
            stages.append(DecoderStage(channels, low_level_channels, projection=decoder_channels,
                                       align_corners=align_corners, **refinement))
            channels = stages[-1].out_channels
        self.coarse = nn.ModuleList(stages)
        self.low_level = conv_bn_relu(finest_channels, decoder_channels, 1)
        self.fuse, channels = refine(channels + decoder_channels, **refinement)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_hidden(nn.ModuleList([self.coarse, self.low_level, self.fuse]))
        init_classifier(self.classifier)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        decoder = self.aspp(features["out"])
        for name, stage in zip(self.coarse_features, self.coarse):
            decoder = stage(decoder, features[name])
        low = self.low_level(features[self.low_level_key])
        decoder = resize_bilinear(decoder, low.shape[-2:], self.align_corners)
        return self.classifier(self.fuse(torch.cat([decoder, low], dim=1)))
