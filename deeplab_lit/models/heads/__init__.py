"""Heads: `head(features: dict) -> logits` on a backbone's named features."""
from deeplab_lit.models.heads.aspp import ASPP, ASPPHead, ImagePooling
from deeplab_lit.models.heads.classifier import AtrousClassifierHead, ClassifierHead
from deeplab_lit.models.heads.decoder import DecoderHead
from deeplab_lit.models.heads.fc import FCBranch, FCHead, MultiScaleFeatures

__all__ = ["ASPP", "ASPPHead", "AtrousClassifierHead", "ClassifierHead", "DecoderHead", "FCBranch", "FCHead",
           "ImagePooling", "MultiScaleFeatures"]
