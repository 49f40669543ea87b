"""Registry entries of `BACKBONES`: each builds its backbone from the model config and says what it
supports, so `models.validate` can refuse a combination before anything is built.

A spec answers: the training output strides (ResNet: more with cascaded blocks), the strides the built network can be switched to in
place for evaluation, whether it has the stride-4 feature the v3+ decoder takes, where multi-grid
applies (if anywhere), whether `cascade_blocks` applies, and which ImageNet weights `imagenet` means.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from deeplab_lit.models.backbones.resnet import ResNetBackbone, max_output_stride
from deeplab_lit.models.backbones.timm_backbone import TimmBackbone, probe
from deeplab_lit.models.backbones.vgg import VGG16Atrous
from deeplab_lit.models.backbones.xception import IMAGENET_TAG, XceptionBackbone

ALL_STRIDES = (8, 16, 32)


class BackboneSpec:
    """Base: a backbone at output stride 8 / 16 / 32, switchable between them, with a stride-4 feature."""

    multi_grid_units: Optional[str] = None  # what multi-grid applies to, for messages; None: nothing
    cascade: bool = False  # v3's cascaded copies of ResNet's block4
    # low-level features a v3+ decoder may name in model.decoder_features (name -> stride); the empty
    # default (the backbone's own stride-4 feature) is always allowed where `has_low_level`
    decoder_features: dict[str, int] = {}

    def __call__(self, cfg) -> nn.Module:
        raise NotImplementedError

    def output_strides(self, cascade_blocks: int = 0) -> tuple[int, ...]:
        return ALL_STRIDES

    def output_stride_refusal(self, output_stride: int, cascade_blocks: int = 0) -> str:
        """Why this backbone cannot be trained at `output_stride` (for messages)."""
        return f"it supports output stride {', '.join(map(str, self.output_strides(cascade_blocks)))}"

    def eval_output_strides(self, output_stride: int, cascade_blocks: int = 0) -> tuple[int, ...]:
        return self.output_strides(cascade_blocks)

    def has_low_level(self, output_stride: int) -> bool:
        return True

    def multi_grid_refusal(self) -> str:
        return "" if self.multi_grid_units else "it has no units to apply it to"


class VGGSpec(BackboneSpec):
    def __call__(self, cfg) -> nn.Module:
        return VGG16Atrous()

    def output_strides(self, cascade_blocks: int = 0) -> tuple[int, ...]:
        return (8,)

    def has_low_level(self, output_stride: int) -> bool:
        return False


class ResNetSpec(BackboneSpec):
    multi_grid_units = "ResNet's block4"
    cascade = True
    decoder_features = ResNetBackbone.feature_strides  # v3+ Table 2: Conv2 = layer1, Conv3 = layer2

    def __init__(self, depth: int):
        self.depth = depth

    def __call__(self, cfg) -> nn.Module:
        return ResNetBackbone(self.depth, output_stride=cfg.output_stride, multi_grid=tuple(cfg.multi_grid),
                              cascade_blocks=cfg.cascade_blocks)

    def output_strides(self, cascade_blocks: int = 0) -> tuple[int, ...]:
        """8, 16, 32, and beyond 32 one doubling per cascaded block that strides (v3 Table 1: OS 64-256)."""
        return tuple(s for s in (8, 16, 32, 64, 128, 256) if s <= max_output_stride(max(0, cascade_blocks)))

    def output_stride_refusal(self, output_stride: int, cascade_blocks: int = 0) -> str:
        return (f"with {cascade_blocks} cascaded blocks it supports "
                f"{', '.join(map(str, self.output_strides(cascade_blocks)))} (above 32, one cascaded block strides "
                "per doubling: set model.cascade_blocks)")


class XceptionSpec(BackboneSpec):
    multi_grid_units = "Xception's exit_flow/block2 (TF unit_rate_list)"

    def __init__(self, variant: str):
        self.variant = variant

    def __call__(self, cfg) -> nn.Module:
        return XceptionBackbone(self.variant, output_stride=cfg.output_stride, multi_grid=tuple(cfg.multi_grid))

    @property
    def timm_weights(self) -> str:
        return f"{self.variant}.{IMAGENET_TAG}"


class TimmSpec(BackboneSpec):
    """`timm:<name>`: what the name supports is read from timm (`timm_backbone.probe`)."""

    def __init__(self, name: str):
        self.name = name
        self.info = probe(name)  # a name timm does not know is a UserError here (validation time)
        self.multi_grid_units = f"timm:{name}'s last stage {self.info.multi_grid_units}" \
            if self.info.multi_grid_units else None

    @classmethod
    def for_name(cls, name: str) -> "TimmSpec":
        return cls(name)

    def __call__(self, cfg) -> nn.Module:
        return TimmBackbone(self.name, output_stride=cfg.output_stride, multi_grid=tuple(cfg.multi_grid))

    @property
    def timm_weights(self) -> str:
        return self.name

    def output_strides(self, cascade_blocks: int = 0) -> tuple[int, ...]:
        return self.info.output_strides

    def output_stride_refusal(self, output_stride: int, cascade_blocks: int = 0) -> str:
        why = self.info.refusals.get(output_stride, "")
        supported = (f"timm builds it at output stride {', '.join(map(str, self.info.output_strides))} only"
                     if self.info.output_strides else "timm builds it at no output stride")
        return supported + (f" ({why})" if why else "")

    def eval_output_strides(self, output_stride: int, cascade_blocks: int = 0) -> tuple[int, ...]:
        return self.info.switchable.get(output_stride, ())

    def has_low_level(self, output_stride: int) -> bool:
        return self.info.low_level.get(output_stride, False)

    def multi_grid_refusal(self) -> str:
        return self.info.multi_grid_refusal
