"""The modified aligned Xception of DeepLab v3+ (Xception-65, and Xception-71 of v3+ Table 7), on timm's modules.

timm's `xception65` / `xception71` (timm/models/xception_aligned.py, "compatible with TF weights") are
TF DeepLab's `xception_65` / `xception_71` (research/deeplab/core/xception.py) module for module, so
timm's ImageNet weights `xception65.tf_in1k` (ported from TF DeepLab's `xception_65_imagenet`) load as
they are. This backbone keeps timm's `stem` and `blocks` under their own names (state-dict keys equal
timm's, minus the classifier `head.fc`) and replaces only the forward (to tap TF's decoder feature) and
the output-stride logic (to switch it in place and apply multi-grid, which timm lacks).

Mapping (checked against both sources; tests/test_xception.py checks the modules):

- stem = TF `entry_flow/conv1_1` (3x3, 32, stride 2) and `conv1_2` (3x3, 64), each conv + BN + ReLU.
- blocks.0-2 = `entry_flow/block1-3` (Xception-65; 128, 256, 728 channels, stride 2 each; Xception-71:
  blocks.0-4 = `entry_flow/block1-5`, strides 2, 1, 2, 1, 2), blocks.3-18 = `middle_flow/block1/unit_1-16`
  (728, identity shortcut), then `exit_flow/block1` (728, 1024, 1024, stride 2, 1x1 conv shortcut) and
  `exit_flow/block2` (1536, 1536, 2048, no shortcut).
- A unit (TF `xception_module`, timm `XceptionModule`) = three separable convs, each depthwise 3x3 ->
  BN -> pointwise 1x1 -> BN; entry and middle flow units apply ReLU *before* each separable conv and none
  inside it (TF `activation_fn_in_separable_conv=False`), `exit_flow/block2` applies ReLU after the
  depthwise and after the pointwise BN instead (`=True`). The stride sits in the third depthwise conv
  and in the 1x1 shortcut. BatchNorm epsilon 1e-3 (TF `xception_arg_scope`).
  The paper's Sec. 3.2 says BN *and ReLU* follow every depthwise conv; TF's code (and therefore its
  ImageNet checkpoint, and timm) has the ReLU there only in `exit_flow/block2`. We follow the code.

Decoder feature (`low_level_feature`): TF's `networks_to_feature_maps[...][DECODER_END_POINTS]` in
core/feature_extractor.py, `xception_65: entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise`
(`xception_71: entry_flow/block3/...`): the output of the second separable conv of the last entry-flow
unit entered at stride 4, i.e. its pointwise BN output *before* the ReLU that precedes the third
(strided) separable conv; 256 channels at stride 4 (`blocks.1.stack.conv2` for Xception-65,
`blocks.2.stack.conv2` for Xception-71). timm's own `features_only` tap of that block is after that
ReLU (`stack.act3`); we take TF's.

Output stride (TF `stack_blocks_dense` after the stride-2 root, as `set_output_stride` implements it):
walking the units in order with the current stride (2 after the stem) and a rate (1): a unit entered
when the current stride already equals the target runs with stride 1 at the current rate, and the rate
is then multiplied by the unit's nominal stride; every other unit keeps its stride at rate 1. The
rate applies to all three depthwise convs of a unit (padding = rate, stride-2 convs padding 1 as TF's
`fixed_padding`); `exit_flow/block2` multiplies it by `multi_grid` (TF `unit_rate_list=multi_grid`).
Xception-65, (entry blocks 1-3 | middle 1-16 | exit block1 | exit block2) rates and strides:

    OS 32: 1, 1, 1 (s2 s2 s2) | 1 | 1 (s2) | 1 x MG
    OS 16: 1, 1, 1 (s2 s2 s2) | 1 | 1 (stride removed) | 2 x MG
    OS 8:  1, 1, 1 (s2 s2, block3 stride removed) | 2 | 2 (stride removed) | 4 x MG

(the v3+ paper: "rate = 2 and rate = 4 to the last two blocks respectively for output_stride = 8"). With
multi-grid (1, 1, 1) this is exactly timm's `create_model(..., output_stride=OS)` (tested). The v3+
paper does not use multi-grid with Xception ("we found [it] does not improve the performance").

Inputs: the data pipeline normalises with the ImageNet mean/std; TF's Xception (and timm's ported
weights) expect [-1, 1] (`_preprocess_zero_mean_unit_range`, timm's mean = std = 0.5). The backbone
maps one to the other with a fixed per-channel affine map (no parameters) before the stem. Padding
that the pipeline fills with the ImageNet mean colour becomes (0.485 - 0.5) / 0.5 = -0.03 instead of
TF's 0, a difference we accept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deeplab_lit.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what datamodules/transforms.py normalises with
IMAGENET_STD = (0.229, 0.224, 0.225)
XCEPTION_MEAN = XCEPTION_STD = (0.5, 0.5, 0.5)  # TF: 2 x / 255 - 1; timm's pretrained_cfg of tf_in1k

# variant: (entry-flow blocks, middle-flow units); both end with exit_flow/block1 and block2
VARIANTS = {"xception65": (3, 16), "xception71": (5, 16)}
IMAGENET_TAG = "tf_in1k"  # timm's port of TF DeepLab's ImageNet checkpoint


def input_renormalisation(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with x_target = x_imagenet * scale + shift, per channel (1 x 3 x 1 x 1)."""
    scale = torch.tensor([s / t for s, t in zip(IMAGENET_STD, std)]).view(1, 3, 1, 1)
    shift = torch.tensor([(m - n) / t for m, n, t in zip(IMAGENET_MEAN, mean, std)]).view(1, 3, 1, 1)
    return scale, shift


def block_names(variant: str) -> list[str]:
    """TF scope of each of timm's blocks, e.g. 'entry_flow/block2', 'middle_flow/unit_3'."""
    entry, middle = VARIANTS[variant]
    return ([f"entry_flow/block{i + 1}" for i in range(entry)] + [f"middle_flow/unit_{i + 1}" for i in range(middle)]
            + ["exit_flow/block1", "exit_flow/block2"])


def _set_depthwise(separable: nn.Module, stride: int, rate: int) -> None:
    conv = separable.conv_dw
    conv.stride = (stride, stride)
    conv.dilation = (rate, rate)
    padding = ((stride - 1) + rate * (conv.kernel_size[0] - 1)) // 2  # timm's symmetric "same" padding
    conv.padding = (padding, padding)
    separable.dilation = rate  # timm's bookkeeping attribute (unused by forward)


class XceptionBackbone(nn.Module):
    """timm's aligned Xception trunk returning `{<TF decoder end point>, "out"}` (see the module docstring)."""

    out_channels = 2048
    pretrained_prefixes = ("stem", "blocks")
    timm_state_prefix = ""  # our state-dict keys are timm's (stem.*, blocks.*)

    def __init__(self, variant: str = "xception65", *, output_stride: int = 16,
                 multi_grid: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        import timm

        if variant not in VARIANTS:
            raise UserError(f"model.backbone={variant!r}: aligned Xception variants are {', '.join(VARIANTS)}")
        net = timm.create_model(variant, pretrained=False, num_classes=0)  # output stride 32: nominal strides
        self.variant = variant
        self.stem, self.blocks = net.stem, net.blocks
        entry, middle = VARIANTS[variant]
        if len(self.blocks) != entry + middle + 2:
            raise RuntimeError(f"timm's {variant} has {len(self.blocks)} blocks, expected {entry + middle + 2}")
        self.block_names = block_names(variant)
        self.nominal_strides = [block.stack.conv3.conv_dw.stride[0] for block in self.blocks]
        # the decoder's feature: inside the stride-2 unit entered at stride 4 (TF DECODER_END_POINTS)
        stride, self.low_level_block = 2, None
        for index, block_stride in enumerate(self.nominal_strides):
            if stride == 4 and block_stride == 2:
                self.low_level_block = index
            stride *= block_stride
        self.low_level_feature = self.block_names[self.low_level_block]
        self.feature_channels = {self.low_level_feature: 256}  # what a v3+ decoder may take, and its stride
        self.feature_strides = {self.low_level_feature: 4}
        self.multi_grid = tuple(int(r) for r in multi_grid)
        scale, shift = input_renormalisation(XCEPTION_MEAN, XCEPTION_STD)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.output_stride = 0
        self.set_output_stride(output_stride)

    def set_output_stride(self, output_stride: int) -> None:
        """TF's `stack_blocks_dense` rule on timm's conv modules, in place (weights untouched)."""
        if output_stride not in (8, 16, 32):
            raise UserError(f"output stride must be 8, 16 or 32 for an Xception backbone, got {output_stride}")
        current, rate = 2, 1  # after the stem's stride-2 conv
        last = len(self.blocks) - 1
        for index, (block, nominal) in enumerate(zip(self.blocks, self.nominal_strides)):
            if current == output_stride:
                block_stride, block_rate = 1, rate
                rate *= nominal
            else:
                block_stride, block_rate = nominal, 1
                current *= nominal
            unit_rates = self.multi_grid if index == last else (1, 1, 1)
            for i, name in enumerate(("conv1", "conv2", "conv3")):
                _set_depthwise(getattr(block.stack, name), block_stride if i == 2 else 1, block_rate * unit_rates[i])
            if block.shortcut is not None:
                block.shortcut.conv.stride = (block_stride, block_stride)
        if current != output_stride:
            raise UserError(f"output stride {output_stride} cannot be reached by {self.variant}")
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x * self.input_scale + self.input_shift)
        features = {}
        for index, block in enumerate(self.blocks):
            if index != self.low_level_block:
                x = block(x)
                continue
            stack = block.stack  # act1, conv1, act2, conv2, act3, conv3 (entry flow: ReLU first)
            low = stack.conv2(stack.act2(stack.conv1(stack.act1(x))))
            features[self.low_level_feature] = low  # TF: separable_conv2_pointwise, before the ReLU
            x = block._residual(stack.conv3(F.relu(low)), x)  # not act3: it is in place and would change `low`
        features["out"] = x
        return features

    def atrous_rates(self) -> dict[str, list[int]]:
        """Depthwise rates per TF block: entry and middle flow one rate per unit, exit flow per separable conv."""
        rates: dict[str, list[int]] = {"entry_flow": [], "middle_flow": []}
        for name, block in zip(self.block_names, self.blocks):
            dilations = [getattr(block.stack, c).conv_dw.dilation[0] for c in ("conv1", "conv2", "conv3")]
            flow = name.split("/")[0]
            if flow == "exit_flow":
                rates[name] = dilations
            else:
                rates[flow].append(dilations[0])
        return rates
