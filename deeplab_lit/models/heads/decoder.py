"""DeepLab v3+ decoder head (v3+ Sec. 3.1, Fig. 2).

encoder = v3 ASPP (without classifier) on `features["out"]`; low-level = the backbone's stride-4 feature
`features[low_level_key]` (ResNet: `layer1`, 256 channels; Xception: TF's entry-flow end point, 256
channels; timm: `stride4`) -> 1x1 conv `decoder_channels` (48) + BN + ReLU. The encoder output is
upsampled bilinearly (align_corners=False) to the low-level map's size (x4 at OS 16; to the exact
size, so odd inputs work), concatenated [encoder, low-level], refined by `decoder_convs` (2) 3x3
convs of 256 channels (BN, ReLU, no bias), then a 1x1 classifier. Logits are at stride 4 whatever
the encoder's output stride; the wrapper upsamples them to the input.
With `separable` (v3+ Table 5 "SC"; TF `decoder_use_separable_conv`) each 3x3 conv is TF's
`_split_separable_conv2d` (depthwise 3x3 -> BN -> ReLU -> pointwise 256 -> BN -> ReLU, `heads/aspp.py`);
the 1x1 projection of the low-level feature stays an ordinary conv, as in TF's `refine_by_decoder`.
With ResNet-101 (v3+ Tables 1-3) they are ordinary 3x3 convs. TF-DeepLab's decoder has no dropout,
nor has this one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deeplab_lit.models.heads.aspp import ASPP, ASPPEncoderHead, conv_bn_relu, separable_conv_bn_relu
from deeplab_lit.models.heads.fc import init_classifier, init_hidden

DECODER_WIDTH = 256


class DecoderHead(ASPPEncoderHead):
    logits_stride = 4  # layer1's stride; independent of the encoder's output stride

    def __init__(self, aspp: ASPP, num_classes: int, *, low_level_channels: int, decoder_channels: int = 48,
                 decoder_convs: int = 2, low_level_key: str = "layer1", separable: bool = False):
        super().__init__(aspp)
        self.low_level_key = low_level_key
        encoder_channels = aspp.project[0].out_channels
        self.low_level = conv_bn_relu(low_level_channels, decoder_channels, 1)
        convs, channels = [], encoder_channels + decoder_channels
        for _ in range(decoder_convs):
            convs.append(separable_conv_bn_relu(channels, DECODER_WIDTH) if separable
                         else conv_bn_relu(channels, DECODER_WIDTH, 3))
            channels = DECODER_WIDTH
        self.fuse = nn.Sequential(*convs)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_hidden(nn.ModuleList([self.low_level, self.fuse]))
        init_classifier(self.classifier)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.low_level(features[self.low_level_key])
        encoder = F.interpolate(self.aspp(features["out"]), size=low.shape[-2:], mode="bilinear",
                                align_corners=False)
        return self.classifier(self.fuse(torch.cat([encoder, low], dim=1)))
