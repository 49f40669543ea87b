"""VGG-16 `fc` head of DeepLab v1 and v2-VGG: fc6 (atrous) -> fc7 -> fc8, one branch per rate.

One branch = fc6 (kernel `fc6_kernel`, dilation r, `fc6_width` filters) -> ReLU -> Dropout ->
fc7 (1x1, `fc6_width`) -> ReLU -> Dropout -> fc8 (1x1, classes). With several rates (v2 ASPP-S,
ASPP-L) the branches run in parallel on pool5 and their logits are **summed** (v2 Sec. 3.1).
v1 rows use one branch: 7x7 r4 4096, 4x4 r4/r8 4096, LargeFOV 3x3 r12 1024.

fc6 keeps the feature size: padding = r * (k - 1) / 2 on each side. For an even kernel (4x4) the
total r * (k - 1) is even whenever r is (r = 4 -> pad 6, as in DeepLab's Caffe 4x4 nets; r = 8 ->
pad 12), so the padding stays symmetric; the 4x4 kernel's taps are then centred half a tap
(r / 2 pixels) off the output pixel, as in Caffe. For an odd total (even kernel, odd rate) the extra
pixel of padding goes to the bottom/right.

LargeFOV's "pool5a" (`pool5_avg`): the released DeepLab-LargeFOV prototxts (train and test) put a 3x3
average pooling, stride 1, pad 1, between pool5 and fc6; the 4x4/7x7 DeepLab and DeepLab-MSc ones
do not. Caffe's average pooling divides by the full 3x3 window at the borders too
(`count_include_pad=True` here).

v1 "MSc" (`msc_features`, v1 Sec. 4 / Table 1): a two-layer MLP (3x3 conv 128, 1x1 conv 128, each
followed by ReLU and dropout 0.5) on the input image and on each of pool1..pool4; the five 128-channel
maps are concatenated to fc7's output, so fc8 sees fc6_width + 640 channels ("the aggregate feature
map fed into the softmax layer is enhanced by 5 * 128 = 640 channels"). The released DeepLab-MSc
prototxt builds the same function differently: each MLP ends in its own 1x1 classifier whose scores
are summed with fc8's; a 1x1 conv over a concatenation is exactly that sum, so the two are one model
(one bias instead of six). From that prototxt: the MLP's 3x3 conv strides by the factor still needed
to reach stride 8 (image 8, pool1 4, pool2 2, pool3/pool4 1; sizes ceil(H / 8), no resizing), each
ReLU is followed by dropout 0.5 (`msc_dropout`), the MLP convs are initialised Gaussian std 0.001 and
the classifier columns std 0.01. With several branches the same MSc features go to every branch's fc8.

Parameter roles: fc6/fc7 are made from VGG-16's fully connected layers ("pretrained" group, see
pretrained.py); fc8 and the MSc MLPs are new.
"""
from __future__ import annotations

import torch
from torch import nn

MSC_SOURCES = {"image": (3, 8), "pool1": (64, 4), "pool2": (128, 2), "pool3": (256, 1), "pool4": (512, 1)}
MSC_CHANNELS = 128


def init_classifier(conv: nn.Conv2d) -> None:
    """Final (logits) layers: Gaussian std 0.01, zero bias, as DeepLab's Caffe fc8."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


def init_hidden(module: nn.Module) -> None:
    """New hidden convs: He init (fan_out, ReLU) like torchvision's backbones; BN weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FCBranch(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, *, kernel: int, rate: int, width: int,
                 dropout: float, extra_channels: int = 0):
        super().__init__()
        total = rate * (kernel - 1)
        if total % 2 == 0:
            self.pad = nn.Identity()
            padding = total // 2
        else:  # even kernel with an odd rate: one more pixel bottom/right
            self.pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))
            padding = 0
        self.rate = rate
        self.fc6 = nn.Conv2d(in_channels, width, kernel, padding=padding, dilation=rate)
        self.fc7 = nn.Conv2d(width, width, 1)
        self.fc8 = nn.Conv2d(width + extra_channels, num_classes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)  # element-wise, like Caffe's Dropout layer
        init_hidden(nn.ModuleList([self.fc6, self.fc7]))
        init_classifier(self.fc8)

    def forward(self, x: torch.Tensor, msc: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(self.relu(self.fc6(self.pad(x))))
        x = self.dropout(self.relu(self.fc7(x)))
        if msc is not None:
            x = torch.cat([x, msc], dim=1)
        return self.fc8(x)


MSC_HIDDEN_STD = 0.001  # released DeepLab-MSc prototxt: the MLP convs' gaussian weight_filler


def relu_dropout(p: float) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(p))


class MultiScaleFeatures(nn.Module):
    """v1 MSc: one two-layer MLP per source (image, pool1..pool4), concatenated (640 channels)."""

    out_channels = MSC_CHANNELS * len(MSC_SOURCES)

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.mlps = nn.ModuleDict({
            name: nn.Sequential(
                nn.Conv2d(channels, MSC_CHANNELS, 3, stride=stride, padding=1), relu_dropout(dropout),
                nn.Conv2d(MSC_CHANNELS, MSC_CHANNELS, 1), relu_dropout(dropout))
            for name, (channels, stride) in MSC_SOURCES.items()})
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=MSC_HIDDEN_STD)
                nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([mlp(features[name]) for name, mlp in self.mlps.items()], dim=1)


class FCHead(nn.Module):
    """Branches of fc6-fc7-fc8 on `features["out"]`, logits summed; optional v1 MSc features."""

    def __init__(self, in_channels: int, num_classes: int, *, rates: list[int], kernel: int, width: int,
                 dropout: float, msc_features: bool = False, msc_dropout: float = 0.5, pool5_avg: bool = False):
        super().__init__()
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True) if pool5_avg else nn.Identity()
        self.msc = MultiScaleFeatures(msc_dropout) if msc_features else None
        extra = self.msc.out_channels if self.msc is not None else 0
        self.kernel, self.width = kernel, width
        self.branches = nn.ModuleList(
            FCBranch(in_channels, num_classes, kernel=kernel, rate=r, width=width, dropout=dropout,
                     extra_channels=extra) for r in rates)
        self.pretrained_prefixes = tuple(
            f"branches.{i}.{layer}" for i in range(len(rates)) for layer in ("fc6", "fc7"))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        msc = self.msc(features) if self.msc is not None else None
        x = self.pool5a(features["out"])
        logits = [branch(x, msc) for branch in self.branches]
        return torch.stack(logits).sum(dim=0) if len(logits) > 1 else logits[0]

    def atrous_rates(self) -> list[int]:
        return [branch.rate for branch in self.branches]
