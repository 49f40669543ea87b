"""VGG-16 in DeepLab's atrous form (v1 Sec. 3.1), output stride 8.

torchvision's `vgg16` convolution layout with the same module indices (`features.0` .. `features.30`),
so torchvision's ImageNet convolution weights load as they are. DeepLab's changes:

- pool1..pool3: 3x3 max pooling, stride 2, padding 1 (DeepLab's Caffe nets; torchvision uses 2x2).
  Caffe rounds pooled sizes up (`ceil_mode`), giving floor(n / 2) + 1; we use PyTorch's default
  floor mode, giving ceil(n / 2). The two agree for odd n, so for the papers' crops (321 = 8k + 1,
  513) they are identical, and floor mode gives the same size rule as the ResNets:
  feature size = ceil(H / 8) for any H.
- pool4, pool5: 3x3 max pooling, stride 1, padding 1 (size kept), so the output stride stays 8.
- conv5_1..conv5_3: dilation 2 (padding 2), compensating pool4's removed stride.

fc6/fc7 are not part of the backbone: they live in the `fc` head (heads/fc.py), which is where
DeepLab varies their kernel, rate and width.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from deeplab_lit.errors import UserError

POOL_INDICES = {4: "pool1", 9: "pool2", 16: "pool3", 23: "pool4", 30: "pool5"}
POOL_STRIDES = {"pool1": 2, "pool2": 2, "pool3": 2, "pool4": 1, "pool5": 1}
CONV5_INDICES = (24, 26, 28)


class VGG16Atrous(nn.Module):
    """Returns `{"pool1", ..., "pool5", "out"}`; `out` = pool5 (512 channels, stride 8).

    pool1..pool4 (strides 2, 4, 8, 8) are what the v1 MSc branches read.
    """

    out_channels = 512
    output_stride = 8
    pretrained_prefixes = ("features",)

    def __init__(self):
        super().__init__()
        features = make_layers(cfgs["D"], batch_norm=False)
        for index, name in POOL_INDICES.items():
            features[index] = nn.MaxPool2d(kernel_size=3, stride=POOL_STRIDES[name], padding=1)
        for index in CONV5_INDICES:
            features[index].dilation = (2, 2)
            features[index].padding = (2, 2)
        for m in features.modules():  # torchvision VGG's init, for training from scratch
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.features = features

    def set_output_stride(self, output_stride: int) -> None:
        if output_stride != 8:
            raise UserError(f"the vgg16 backbone has a fixed output stride of 8, got {output_stride}; "
                            "set the output stride to 8 (model.output_stride / eval.output_stride)")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in POOL_INDICES:
                features[POOL_INDICES[index]] = x
        features["out"] = x
        return features

    def atrous_rates(self) -> dict[str, list[int]]:
        return {"conv5": [self.features[i].dilation[0] for i in CONV5_INDICES]}
