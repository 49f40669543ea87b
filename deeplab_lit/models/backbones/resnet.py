"""ResNet-50/101 as DeepLab uses them: atrous output stride 8/16/32, multi-grid, cascaded blocks.

The modules are torchvision's own (`conv1`, `bn1`, `layer1`..`layer4` with the same names), so a
torchvision ImageNet state dict loads into this backbone as it is (minus `fc.*`). Output stride is a
property of the conv strides and dilations only, which is why it can be switched in place.

Atrous rules (documented choices where the papers and torchvision differ):

- layer2, layer3: torchvision's `replace_stride_with_dilation` rule. Once the target output stride
  is reached, a layer's stride is removed and its dilation doubled; the unit that carried the stride
  (the first, torchvision's ResNet v1.5 strides in its 3x3 conv) keeps the previous dilation and the
  following units use the doubled one. This is the exact atrous conversion of the ImageNet network,
  and it is what TF-DeepLab does too (there the stride sits in the last unit of the previous block,
  which likewise keeps the old rate).
- layer4 (= the paper's block4): the paper's multi-grid rule. The block rate is 1/2/4 at output
  stride 32/16/8 and *every* unit uses block_rate * multi_grid[i]: OS 16 + MG (1, 2, 4) -> 2, 4, 8;
  OS 8 -> 4, 8, 16 (v3 Sec. 3.2; v2's Caffe ResNet also has all res5 units at rate 4 at OS 8).
  torchvision's rule would give layer4's first unit the previous dilation instead (OS 8 with
  MG (1, 1, 1): torchvision 2, 4, 4, ours 4, 4, 4). That single conv is the only difference from
  `resnet101(replace_stride_with_dilation=[False, True, True])`; tests/test_models.py checks both.
  At OS 32 layer4 keeps its stride (first unit) and uses dilations 1 * multi_grid.
- cascaded blocks block5..block(4+N) (v3 Tables 1-3): copies of block4's structure (3 bottleneck
  units, 2048 -> 512 -> 2048, identity shortcuts), each block's rate double the previous block's,
  times the multi-grid. As in v3 Sec. 3.1 ("there are three 3x3 convolutions in those blocks, and
  the last convolution contains stride 2 except the one in last block, similar to original ResNet")
  a cascaded block strides while the target output stride is not reached and is atrous after it
  ("no striding after the target output stride is reached"): at OS 8/16/32 they never stride (with
  OS 32 the target is reached at block4, so block5..7 use rates 2, 4, 8); at OS 64/128/256 (v3
  Table 1, 256 = no atrous convolution at all) block5, block6, block7 stride in turn. A striding
  cascaded unit keeps its identity shortcut, subsampled (a 1x1 max pooling with stride 2, TF's
  `resnet_utils.subsample`), since block4's copies have no projection shortcut. The stride sits in the
  first unit's 3x3 conv, as everywhere in torchvision's ResNet (TF puts it in the last unit).
  They are randomly initialised (torchvision's ResNet init) and belong to the "new" parameter group:
  an ImageNet ResNet has no block5, the first unit's 1x1 conv (2048 inputs) cannot take layer4's
  first-unit weights (1024 inputs), and TF-DeepLab restores only variables present in the checkpoint.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from deeplab_lit.errors import UserError


RESNET_BUILDERS = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
STEM_STRIDE = 4  # conv1 (stride 2) + maxpool (stride 2)


def _set_unit(unit: Bottleneck, stride: int, dilation: int) -> None:
    """Give one bottleneck unit its stride and dilation (3x3 conv padding = dilation keeps sizes)."""
    unit.conv2.stride = (stride, stride)
    unit.conv2.dilation = (dilation, dilation)
    unit.conv2.padding = (dilation, dilation)
    if unit.downsample is not None:
        unit.downsample[0].stride = (stride, stride)
    unit.stride = stride  # torchvision's bookkeeping attribute; unused by forward


def _set_cascade_unit(unit: Bottleneck, stride: int, dilation: int) -> None:
    """A unit of a cascaded block: its identity shortcut is subsampled when the unit strides."""
    _set_unit(unit, stride, dilation)
    unit.downsample = nn.MaxPool2d(kernel_size=1, stride=stride) if stride > 1 else None


def max_output_stride(cascade_blocks: int) -> int:
    """32 from the trunk, doubled by every cascaded block that may stride."""
    return 32 * 2 ** cascade_blocks


def _init_like_torchvision(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetBackbone(nn.Module):
    """torchvision ResNet trunk returning `{"layer1", ..., "layer4", "block5", ..., "out"}`.

    `layer1` is the stride-4 feature (256 channels) that the v3+ decoder uses; `out` is the last
    block's output (2048 channels) at `output_stride`.
    """

    out_channels = 2048
    # what a v3+ decoder may take (v3+ Table 2: Conv2 = layer1, Conv3 = layer2), with each one's stride
    feature_channels = {"layer1": 256, "layer2": 512, "layer3": 1024}
    feature_strides = {"layer1": 4, "layer2": 8, "layer3": 16}
    low_level_feature = "layer1"  # the v3+ decoder's stride-4 feature (TF: block1/unit_2/bottleneck_v1/conv3)
    pretrained_prefixes = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, depth: int = 101, *, output_stride: int = 16,
                 multi_grid: tuple[int, int, int] = (1, 1, 1), cascade_blocks: int = 0):
        super().__init__()
        net = RESNET_BUILDERS[depth](weights=None)
        self.depth = depth
        self.multi_grid = tuple(int(r) for r in multi_grid)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.cascade_names = [f"block{5 + i}" for i in range(cascade_blocks)]
        for name in self.cascade_names:
            block = nn.Sequential(*[Bottleneck(2048, 512) for _ in range(3)])
            _init_like_torchvision(block)
            setattr(self, name, block)
        self.output_stride = 0
        self.set_output_stride(output_stride)

    def set_output_stride(self, output_stride: int) -> None:
        """Set strides and dilations in place for output stride 8, 16, 32 (or up to 32 x 2^cascaded blocks,
        v3 Table 1), weights untouched."""
        allowed = [8, 16, 32] + [32 * 2 ** k for k in range(1, len(self.cascade_names) + 1)]
        if output_stride not in allowed:
            raise UserError(f"output stride must be one of {', '.join(map(str, allowed))} for this ResNet backbone "
                            f"({len(self.cascade_names)} cascaded blocks), got {output_stride}")
        stride, dilation = STEM_STRIDE, 1
        for layer in (self.layer2, self.layer3):
            previous = dilation
            if stride < output_stride:
                layer_stride, stride = 2, stride * 2
            else:
                layer_stride, dilation = 1, dilation * 2
            _set_unit(layer[0], layer_stride, previous)
            for unit in layer[1:]:
                _set_unit(unit, 1, dilation)
        if stride < output_stride:  # only at output stride 32
            layer4_stride = 2
        else:
            layer4_stride, dilation = 1, dilation * 2
        for i, unit in enumerate(self.layer4):
            _set_unit(unit, layer4_stride if i == 0 else 1, dilation * self.multi_grid[i])
        if layer4_stride == 2:
            stride *= 2
        for name in self.cascade_names:
            if stride < output_stride:
                block_stride, stride = 2, stride * 2
            else:
                block_stride, dilation = 1, dilation * 2
            for i, unit in enumerate(getattr(self, name)):
                _set_cascade_unit(unit, block_stride if i == 0 else 1, dilation * self.multi_grid[i])
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = {}
        for name in ["layer1", "layer2", "layer3", "layer4", *self.cascade_names]:
            x = getattr(self, name)(x)
            features[name] = x
        features["out"] = x
        return features

    def atrous_rates(self) -> dict[str, list[int]]:
        """Dilation of each unit's 3x3 conv, per layer/block (for the summary command)."""
        names = ["layer1", "layer2", "layer3", "layer4", *self.cascade_names]
        return {name: [unit.conv2.dilation[0] for unit in getattr(self, name)] for name in names}
