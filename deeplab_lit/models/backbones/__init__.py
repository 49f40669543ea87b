"""Backbones: each returns a dict of named features whose `"out"` is the last feature map."""
from deeplab_lit.models.backbones.resnet import ResNetBackbone
from deeplab_lit.models.backbones.vgg import VGG16Atrous

__all__ = ["ResNetBackbone", "VGG16Atrous"]
