"""DeepLab v3+ decoder head (v3+ Sec. 3.1, Fig. 2) on a ResNet encoder.

encoder = v3 ASPP (without classifier) on `features["out"]`; low-level = `features["layer1"]`
(stride 4, 256 channels) -> 1x1 conv `decoder_channels` (48) + BN + ReLU. The encoder output is
upsampled bilinearly (align_corners=False) to the low-level map's size (x4 at OS 16; to the exact
size, so odd inputs work), concatenated [encoder, low-level], refined by `decoder_convs` (2) 3x3
convs of 256 channels (BN, ReLU, no bias), then a 1x1 classifier. Logits are at stride 4 whatever
the encoder's output stride; the wrapper upsamples them to the input.
The paper's Xception decoder uses depthwise-separable 3x3 convs; with ResNet-101 (v3+ Tables 1-3)
they are ordinary 3x3 convs. TF-DeepLab's decoder has no dropout, nor has this one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deeplab_lit.models.heads.aspp import ASPP, ASPPEncoderHead, conv_bn_relu
from deeplab_lit.models.heads.fc import init_classifier, init_hidden

DECODER_WIDTH = 256


class DecoderHead(ASPPEncoderHead):
    logits_stride = 4  # layer1's stride; independent of the encoder's output stride

    def __init__(self, aspp: ASPP, num_classes: int, *, low_level_channels: int, decoder_channels: int = 48,
                 decoder_convs: int = 2):
        super().__init__(aspp)
        encoder_channels = aspp.project[0].out_channels
        self.low_level = conv_bn_relu(low_level_channels, decoder_channels, 1)
        convs, channels = [], encoder_channels + decoder_channels
        for _ in range(decoder_convs):
            convs.append(conv_bn_relu(channels, DECODER_WIDTH, 3))
            channels = DECODER_WIDTH
        self.fuse = nn.Sequential(*convs)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_hidden(nn.ModuleList([self.low_level, self.fuse]))
        init_classifier(self.classifier)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.low_level(features["layer1"])
        encoder = F.interpolate(self.aspp(features["out"]), size=low.shape[-2:], mode="bilinear",
                                align_corners=False)
        return self.classifier(self.fuse(torch.cat([encoder, low], dim=1)))
