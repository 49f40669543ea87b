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

v1 "MSc" (`msc_features`, v1 Sec. 4 / Table 1): a two-layer MLP (3x3 conv 128 + ReLU, 1x1 conv 128 +
ReLU) on the input image and on each of pool1..pool4; the five 128-channel maps are concatenated to
the last feature map of the main network, fc7's output, so fc8 sees fc6_width + 640 channels ("the
aggregate feature map fed into the softmax layer is enhanced by 5 * 128 = 640 channels"). The paper
does not say how the finer maps reach stride 8; we stride each MLP's 3x3 conv by the remaining factor
(image 8, pool1 4, pool2 2, pool3/pool4 1), which yields exactly the final size ceil(H / 8), so no
resizing is needed (and is cheaper than running the MLP at full resolution). With several branches
the same MSc features are concatenated to every branch's fc7 output.

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


class MultiScaleFeatures(nn.Module):
    """v1 MSc: one two-layer MLP per source (image, pool1..pool4), concatenated (640 channels)."""

    out_channels = MSC_CHANNELS * len(MSC_SOURCES)

    def __init__(self):
        super().__init__()
        self.mlps = nn.ModuleDict({
            name: nn.Sequential(
                nn.Conv2d(channels, MSC_CHANNELS, 3, stride=stride, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(MSC_CHANNELS, MSC_CHANNELS, 1), nn.ReLU(inplace=True))
            for name, (channels, stride) in MSC_SOURCES.items()})
        init_hidden(self)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([mlp(features[name]) for name, mlp in self.mlps.items()], dim=1)


class FCHead(nn.Module):
    """Branches of fc6-fc7-fc8 on `features["out"]`, logits summed; optional v1 MSc features."""

    def __init__(self, in_channels: int, num_classes: int, *, rates: list[int], kernel: int, width: int,
                 dropout: float, msc_features: bool = False):
        super().__init__()
        self.msc = MultiScaleFeatures() if msc_features else None
        extra = self.msc.out_channels if self.msc is not None else 0
        self.kernel, self.width = kernel, width
        self.branches = nn.ModuleList(
            FCBranch(in_channels, num_classes, kernel=kernel, rate=r, width=width, dropout=dropout,
                     extra_channels=extra) for r in rates)
        self.pretrained_prefixes = tuple(
            f"branches.{i}.{layer}" for i in range(len(rates)) for layer in ("fc6", "fc7"))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        msc = self.msc(features) if self.msc is not None else None
        logits = [branch(features["out"], msc) for branch in self.branches]
        return torch.stack(logits).sum(dim=0) if len(logits) > 1 else logits[0]

    def atrous_rates(self) -> list[int]:
        return [branch.rate for branch in self.branches]
