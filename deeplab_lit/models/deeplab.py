"""The DeepLab network: backbone + head, optional v2 MSC input pyramid, upsampling to the input.

`model(x)` returns a dict:
- `"logits"`: the head's logits before the final upsampling. Their size is
  `model.logits_size(H, W)` = (ceil(H' / s), ceil(W' / s)), where s = `model.logits_stride`
  (the backbone's output stride; 4 for v3+) and H' x W' the input size (with MSC: the largest
  scale's input size). Every conv, pool and stride in the zoo is padded so that each stride-2 step
  maps n to ceil(n / 2), which is where this rule comes from; it is what the v1 loss needs to
  downsample the ground truth to the logits (nearest).
- `"out"`: the logits upsampled bilinearly to the input size.
- with MSC (`msc_scales`, v2 Sec. 3.3) in training mode, `"scale_logits"`: each scale's logits at
  its own head resolution, in `msc_scales` order, for the loss that sums every scale's and the fused
  logits' cross-entropy.

MSC: the input is resized bilinearly for each scale s (s = 1 runs on the input
itself) to `msc_sizes`: "floor" = floor(H * s) (what `F.interpolate(scale_factor=s)` gives) or "caffe"
= DeepLab v2's Interp layer arithmetic for s = p/q: shrink by q then zoom by p, ((H - 1) // q) * p + 1
(deeplab-public interp_layer.cpp: shrink (n - 1) / q + 1, zoom n + (n - 1)(p - 1)); for the 321 crop
and s = 0.75, 0.5 that is 241 and 161 (floor: 240, 160). The same
backbone and head run on each, every scale's logits are upsampled bilinearly to the largest scale's
logits size and fused by element-wise max into `"logits"`. Evaluation returns only the fused map.

Every bilinear resize of the zoo (here, the v3+ decoder, the loss, multi-scale evaluation) goes through
`resize.resize_bilinear` with the model's `align_corners` (`model.align_corners`; the papers' code aligns
corners, see resize.py).
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch
from torch import nn

from deeplab_lit.models.batchnorm import apply_batchnorm_policy, keep_frozen_layers_in_eval
from deeplab_lit.models.resize import resize_bilinear


MSC_SIZES = ("floor", "caffe")


def caffe_interp_size(n, scale: float):
    """Caffe Interp: shrink by q, then zoom by p, for scale = p / q (ints, or int64 tensors while tracing)."""
    fraction = Fraction(scale).limit_denominator(64)
    size = ((n - 1) // fraction.denominator) * fraction.numerator + 1
    return torch.clamp(size, min=1) if isinstance(size, torch.Tensor) else max(1, size)


def scaled_size(height, width, scale: float, rule: str = "floor") -> tuple:
    """Input size of one MSC scale; floor: floor(n * s), at least 1 (1e-9 absorbs float error: 0.29 * 100).

    While tracing (ONNX/TorchScript export) the sizes are tensors: the same arithmetic is kept as graph
    operations, so the exported pyramid follows the input size instead of freezing the traced one."""
    if scale == 1.0:
        return height, width
    if rule == "caffe":
        return caffe_interp_size(height, scale), caffe_interp_size(width, scale)
    if isinstance(height, torch.Tensor):
        return tuple(torch.clamp(torch.floor(n.to(torch.float64) * scale + 1e-9), min=1).to(torch.int64)
                     for n in (height, width))
    return max(1, math.floor(height * scale + 1e-9)), max(1, math.floor(width * scale + 1e-9))


class DeepLab(nn.Module):
    """Any DeepLab generation; `generation` is a label, the structure comes from backbone and head.

    BatchNorm follows `bn_mode` and `bn_momentum` as `models/batchnorm.py` states (the one place).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, generation: str, msc_scales=(),
                 msc_sizes: str = "floor", bn_mode: str = "finetune", bn_momentum: float = 0.1,
                 align_corners: bool = True):
        super().__init__()
        self.align_corners = align_corners
        self.backbone = backbone
        self.head = head
        self.generation = generation
        self.msc_scales = [float(s) for s in msc_scales]
        self.msc_sizes = msc_sizes
        self.bn_mode = bn_mode
        self.init_source = "none"  # set by the pretrained loader: "imagenet:<file>" or the path
        apply_batchnorm_policy(self, bn_mode, bn_momentum)
        keep_frozen_layers_in_eval(self, bn_mode)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_layers_in_eval(self, self.bn_mode)
        return self

    # --- output stride -------------------------------------------------------------------------

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    @property
    def logits_stride(self) -> int:
        return getattr(self.head, "logits_stride", None) or self.backbone.output_stride

    def set_output_stride(self, output_stride: int) -> None:
        """Switch strides/dilations in place (same weights); v3 ASPP rates follow unless absolute."""
        self.backbone.set_output_stride(output_stride)
        if hasattr(self.head, "set_output_stride"):
            self.head.set_output_stride(output_stride)

    def logits_size(self, height: int, width: int) -> tuple[int, int]:
        if self.msc_scales:
            height, width = scaled_size(height, width, max(self.msc_scales), self.msc_sizes)
        s = self.logits_stride
        return math.ceil(height / s), math.ceil(width / s)

    # --- forward -------------------------------------------------------------------------------

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head({"image": x, **self.backbone(x)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        size = x.shape[-2:]
        if not self.msc_scales:
            outputs = {"logits": self._logits(x)}
        else:
            scale_logits = []
            for scale in self.msc_scales:
                xs = x if scale == 1.0 else resize_bilinear(
                    x, scaled_size(size[0], size[1], scale, self.msc_sizes), self.align_corners)
                scale_logits.append(self._logits(xs))
            largest = scale_logits[self.msc_scales.index(max(self.msc_scales))]
            fused = functools.reduce(torch.maximum, [resize_bilinear(l, largest.shape[-2:], self.align_corners)
                                                     for l in scale_logits])
            outputs = {"logits": fused}
            if self.training:
                outputs["scale_logits"] = scale_logits
        outputs["out"] = resize_bilinear(outputs["logits"], size, self.align_corners)
        return outputs

    # --- introspection for training and the summary command --------------------------------------

    def named_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """`pretrained`: initialised from ImageNet (backbone trunk; VGG heads' fc6/fc7); `new`: the rest.

        Grouping is by role, whatever `model.pretrained` is, so a recipe's lr multipliers apply the
        same way. Cascaded ResNet blocks are "new" (random init, see backbones/resnet.py). Frozen BN
        parameters are included (requires_grad=False); optimisers skip them.
        """
        prefixes = [f"backbone.{p}" for p in self.backbone.pretrained_prefixes]
        prefixes += [f"head.{p}" for p in getattr(self.head, "pretrained_prefixes", ())]
        groups = {"pretrained": [], "new": []}
        for name, param in self.named_parameters():
            pretrained = any(name.startswith(prefix + ".") for prefix in prefixes)
            groups["pretrained" if pretrained else "new"].append((name, param))
        return groups

    def atrous_rates(self) -> dict[str, object]:
        """Rates actually in use: each backbone layer's per-unit dilations and the head's rates."""
        return {"output_stride": self.output_stride, **self.backbone.atrous_rates(),
                "head": self.head.atrous_rates(), "msc_scales": list(self.msc_scales)}
