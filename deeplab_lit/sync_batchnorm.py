"""`model.bn=sync`: Lightning's SyncBatchNorm plugin, keeping the activation of timm's fused BatchNormAct2d
layers (Xception's stem, timm backbones), which torch's own `convert_sync_batchnorm` would drop.

A module of its own (not a class defined inside a function) so that the plugin pickles by name.
"""
from __future__ import annotations

from lightning.pytorch.plugins import TorchSyncBatchNorm

from deeplab_lit.models.batchnorm import convert_sync_batchnorm, revert_sync_batchnorm


class SyncBatchNormKeepingActivations(TorchSyncBatchNorm):
    def apply(self, model):
        return convert_sync_batchnorm(model)

    def revert(self, model):
        return revert_sync_batchnorm(model)
