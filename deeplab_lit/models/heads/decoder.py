"""DeepLab v3+ decoder head (v3+ Sec. 3.1, Fig. 2; the variants of Table 2).

encoder = v3 ASPP (without classifier) on `features["out"]`. The decoder takes one or more low-level
features, coarse to fine (`decoder_features`; the paper's model: `["layer1"]`, "Conv2", stride 4). For
each: the low-level map -> 1x1 conv `decoder_channels` (48) + BN + ReLU; the running decoder map is
upsampled bilinearly (align_corners=False) to that map's size (x4 at OS 16 for layer1; to the exact
size, so odd inputs work), concatenated [decoder, low-level] and refined by `decoder_convs` convs of
`decoder_width` channels and kernel `decoder_kernel` (BN, ReLU, no bias). Then a 1x1 classifier.

v3+ Table 2 rows: [3x3, 256] x1, x2 (the model), x3; [3x3, 128]; [1x1, 256]; and Conv2 + Conv3
(`decoder_features: [layer2, layer1]`: "the decoder feature map are gradually upsampled by 2,
concatenated with Conv3 first and then Conv2, and each will be refined by the [3x3, 256] operation";
each stage gets its own 48-channel projection and `decoder_convs` refinement convs).
Logits are at the stride of the finest feature (4 for layer1) whatever the encoder's output stride;
the wrapper upsamples them to the input. The paper's Xception decoder uses depthwise-separable 3x3
convs; with ResNet-101 (v3+ Tables 1-3) they are ordinary convs. TF-DeepLab's decoder has no dropout,
nor has this one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deeplab_lit.models.heads.aspp import ASPP, ASPPEncoderHead, conv_bn_relu
from deeplab_lit.models.heads.fc import init_classifier, init_hidden

FEATURE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16}


def refine(in_channels: int, convs: int, width: int, kernel: int) -> tuple[nn.Sequential, int]:
    layers, channels = [], in_channels
    for _ in range(convs):
        layers.append(conv_bn_relu(channels, width, kernel))
        channels = width
    return nn.Sequential(*layers), channels


class DecoderStage(nn.Module):
    """A coarser decoder step (Conv3 of the Conv2 + Conv3 variant): project, upsample, concatenate, refine."""

    def __init__(self, in_channels: int, low_level_channels: int, *, projection: int, convs: int, width: int,
                 kernel: int):
        super().__init__()
        self.low_level = conv_bn_relu(low_level_channels, projection, 1)
        self.fuse, self.out_channels = refine(in_channels + projection, convs, width, kernel)

    def forward(self, decoder: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low = self.low_level(low_level)
        decoder = F.interpolate(decoder, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([decoder, low], dim=1))


class DecoderHead(ASPPEncoderHead):
    """`low_level` / `fuse` act on the finest feature (layer1 in the paper's model); `coarse` holds the
    steps on coarser features before it, if any."""

    def __init__(self, aspp: ASPP, num_classes: int, *, feature_channels: dict[str, int], decoder_channels: int = 48,
                 decoder_convs: int = 2, decoder_width: int = 256, decoder_kernel: int = 3,
                 decoder_features=("layer1",)):
        super().__init__(aspp)
        *coarse, self.finest = list(decoder_features)
        self.coarse_features = coarse
        self.logits_stride = FEATURE_STRIDES[self.finest]
        channels, stages = aspp.project[0].out_channels, []
        for name in coarse:
            stages.append(DecoderStage(channels, feature_channels[name], projection=decoder_channels,
                                       convs=decoder_convs, width=decoder_width, kernel=decoder_kernel))
            channels = stages[-1].out_channels
        self.coarse = nn.ModuleList(stages)
        self.low_level = conv_bn_relu(feature_channels[self.finest], decoder_channels, 1)
        self.fuse, channels = refine(channels + decoder_channels, decoder_convs, decoder_width, decoder_kernel)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_hidden(nn.ModuleList([self.coarse, self.low_level, self.fuse]))
        init_classifier(self.classifier)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        decoder = self.aspp(features["out"])
        for name, stage in zip(self.coarse_features, self.coarse):
            decoder = stage(decoder, features[name])
        low = self.low_level(features[self.finest])
        decoder = F.interpolate(decoder, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([decoder, low], dim=1)))
