"""Backbones: each returns a dict of named features whose `"out"` is the last feature map."""
from deeplab_lit.models.backbones.resnet import ResNetBackbone
from deeplab_lit.models.backbones.timm_backbone import TimmBackbone
from deeplab_lit.models.backbones.vgg import VGG16Atrous
from deeplab_lit.models.backbones.xception import XceptionBackbone

__all__ = ["ResNetBackbone", "TimmBackbone", "VGG16Atrous", "XceptionBackbone"]
