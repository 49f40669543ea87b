"""The BatchNorm policy of a DeepLab network, in one place (`model.bn`, `model.bn_momentum`).

- `finetune` (v3, v3+; TF DeepLab's `fine_tune_batch_norm=True`): every BatchNorm layer, in the
  backbone and in the new layers (ASPP, decoder), normalises with batch statistics in training,
  updates its running statistics with momentum `bn_momentum` (PyTorch convention: TF decay 0.9997 =
  momentum 0.0003) and trains its scale and shift.
- `sync`: as `finetune`, with statistics over all processes (the Trainer converts the layers to
  SyncBatchNorm with `convert_sync_batchnorm` below, which keeps the ReLU of timm's fused
  `BatchNormAct2d` layers; torch's own conversion would replace them by a bare SyncBatchNorm).
- `frozen` (v2's ResNet-101, Caffe `use_global_stats: true` with the Scale layers' lr_mult 0): every
  BatchNorm layer normalises with its running statistics, in training too, never updates them, and its
  scale and shift are not trained. (v2's ResNet heads have no BatchNorm; in a network whose new layers
  have BatchNorm, those layers keep their initial statistics and affine, i.e. they are identities.)
- `frozen_stats` (TF DeepLab's `fine_tune_batch_norm=False`, v3 Table 8's "without fine-tuning BN"):
  TF builds every BatchNorm, backbone and new layers alike, with `is_training=False`, so each normalises
  with its moving statistics (ImageNet's in the backbone, the initial 0 / 1 in new layers) and never
  updates them; its scale (gamma) and shift (beta) stay trainable variables and are trained.

TF DeepLab's decay: 0.9997 for ASPP, decoder and Xception, 0.95 for its ResNet backbones
(core/feature_extractor.py); the v3 paper states 0.9997, which the experiments use everywhere.

`DeepLab` applies the policy when it is built and again in every `train()` call, so nothing else
(LightningModule, inference, evaluation) touches BatchNorm.
"""
from __future__ import annotations

from torch import nn

BN_MODES = ("frozen", "frozen_stats", "finetune", "sync")
STATISTICS_FIXED = ("frozen", "frozen_stats")


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def apply_batchnorm_policy(network: nn.Module, mode: str, momentum: float) -> None:
    """Set momentum and trainability of every BatchNorm layer once, at construction."""
    for bn in batchnorm_layers(network):
        bn.momentum = momentum
        if mode == "frozen":
            for parameter in bn.parameters():
                parameter.requires_grad_(False)


def keep_frozen_layers_in_eval(network: nn.Module, mode: str) -> None:
    """After `network.train()`: BatchNorm layers with fixed statistics normalise with their running ones."""
    if mode in STATISTICS_FIXED:
        for bn in batchnorm_layers(network):
            bn.eval()


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer -> SyncBatchNorm; timm's BatchNormAct2d -> SyncBatchNormAct with its act/drop."""
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(module)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of `convert_sync_batchnorm` (same parameters and statistics, activations kept)."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    converted = module
    if isinstance(module, nn.SyncBatchNorm):
        args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if isinstance(module, SyncBatchNormAct):
            converted = BatchNormAct2d(*args)
            converted.act, converted.drop = module.act, module.drop
        else:
            converted = nn.BatchNorm2d(*args)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, revert_sync_batchnorm(child))
    return converted
