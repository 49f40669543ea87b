"""`build_model(cfg.model, num_classes)`: registries of backbones, heads and generations.

A new backbone or head is one file plus one `register` line in `BACKBONES` / `HEADS` (registry.py);
the config's allowed names and `--help` come from these registries. A generation builder
composes backbone and head into a `DeepLab`: v1, v2 and v3 put the configured head on the backbone
(v2 adds the MSC pyramid through `msc_scales`); v3plus wraps the v3 ASPP into the decoder head.
Combinations that cannot work are refused with a UserError naming the key.
"""
from __future__ import annotations

from typing import Callable

from deeplab_lit.errors import UserError
from deeplab_lit.models.batchnorm import BN_MODES
from torch import nn

from deeplab_lit.models.backbones import ResNetBackbone, VGG16Atrous
from deeplab_lit.models.backbones.resnet import max_output_stride
from deeplab_lit.models.deeplab import DeepLab
from deeplab_lit.models.heads.decoder import FEATURE_STRIDES
from deeplab_lit.models.heads import ASPP, ASPPHead, AtrousClassifierHead, ClassifierHead, DecoderHead, FCHead
from deeplab_lit.models.pretrained import load_pretrained
from deeplab_lit.registry import Registry


def _resnet(depth: int) -> Callable:
    def build(cfg) -> ResNetBackbone:
        return ResNetBackbone(depth, output_stride=cfg.output_stride, multi_grid=tuple(cfg.multi_grid),
                              cascade_blocks=cfg.cascade_blocks)
    return build


BACKBONES: Registry[Callable] = Registry("model.backbone")
BACKBONES.register("vgg16", lambda cfg: VGG16Atrous(), "DeepLab's atrous VGG-16 (output stride 8)")
BACKBONES.register("resnet50", _resnet(50), "torchvision ResNet-50, output stride 8/16/32, multi-grid, cascade")
BACKBONES.register("resnet101", _resnet(101), "torchvision ResNet-101, output stride 8/16/32, multi-grid, cascade")


def build_aspp(cfg, backbone) -> ASPP:
    return ASPP(backbone.out_channels, rates=list(cfg.aspp_rates), channels=cfg.aspp_channels,
                image_pooling=cfg.image_pooling, rates_absolute=cfg.aspp_rates_absolute,
                dropout=cfg.aspp_dropout, output_stride=backbone.output_stride)


HEADS: Registry[Callable] = Registry("model.head")
HEADS.register("fc", lambda cfg, backbone, n: FCHead(
    backbone.out_channels, n, rates=list(cfg.aspp_rates), kernel=cfg.fc6_kernel, width=cfg.fc6_width,
    dropout=cfg.dropout, msc_features=cfg.msc_features, msc_dropout=cfg.msc_dropout, pool5_avg=cfg.pool5_avg),
    "VGG fc6-fc7-fc8 per rate, summed (v1, v2 VGG)")
HEADS.register("classifier", lambda cfg, backbone, n: ClassifierHead(backbone.out_channels, n),
               "one 1x1 classifier (v2 ResNet, v3 cascaded blocks)")
HEADS.register("atrous_classifier", lambda cfg, backbone, n: AtrousClassifierHead(
    backbone.out_channels, n, rates=list(cfg.aspp_rates)), "3x3 atrous classifiers summed (v2 ResNet ASPP)")
HEADS.register("aspp", lambda cfg, backbone, n: ASPPHead(build_aspp(cfg, backbone), n),
               "v3 ASPP + 1x1 classifier (v3, v3+ encoder)")


def _deeplab(cfg, backbone, head) -> DeepLab:
    return DeepLab(backbone, head, generation=cfg.generation, msc_scales=cfg.msc_scales, msc_sizes=cfg.msc_sizes,
                   bn_mode=cfg.bn, bn_momentum=cfg.bn_momentum)


def _backbone_and_head(cfg, backbone, num_classes) -> DeepLab:
    return _deeplab(cfg, backbone, HEADS[cfg.head](cfg, backbone, num_classes))


def _v3plus(cfg, backbone, num_classes) -> DeepLab:
    head = DecoderHead(build_aspp(cfg, backbone), num_classes, feature_channels=backbone.feature_channels,
                       decoder_channels=cfg.decoder_channels, decoder_convs=cfg.decoder_convs,
                       decoder_width=cfg.decoder_width, decoder_kernel=cfg.decoder_kernel,
                       decoder_features=cfg.decoder_features)
    return _deeplab(cfg, backbone, head)


GENERATIONS: Registry[Callable] = Registry("model.generation")
GENERATIONS.register("v1", _backbone_and_head, "DeepLab v1: VGG-16, fc head, loss at stride 8")
GENERATIONS.register("v2", _backbone_and_head, "DeepLab v2: VGG-16 or ResNet, ASPP by summed logits, MSC")
GENERATIONS.register("v3", _backbone_and_head, "DeepLab v3: ResNet, ASPP with BatchNorm and image pooling")
GENERATIONS.register("v3plus", _v3plus, "DeepLab v3+: the v3 encoder and a decoder on the stride-4 feature")
RESNETS = ("resnet50", "resnet101")


def validate(cfg, num_classes: int) -> None:
    """Refuse networks the zoo cannot build, naming the key and what to do (the rules live here only)."""
    GENERATIONS[cfg.generation]
    BACKBONES[cfg.backbone]
    HEADS[cfg.head]
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if cfg.head == "fc" and cfg.backbone != "vgg16":
        raise UserError(f"model.head=fc needs model.backbone=vgg16 (fc6/fc7 are VGG-16's fully connected "
                        f"layers), got {cfg.backbone}; ResNet heads are classifier, atrous_classifier, aspp")
    if cfg.generation == "v1" and (cfg.backbone != "vgg16" or cfg.head != "fc"):
        raise UserError("model.generation=v1 is VGG-16 with the fc head: set model.backbone=vgg16 and "
                        f"model.head=fc (got {cfg.backbone}, {cfg.head})")
    if cfg.generation == "v3plus" and (cfg.backbone not in RESNETS or cfg.head != "aspp"):
        raise UserError("model.generation=v3plus needs a ResNet backbone (its stride-4 layer1 feeds the decoder) "
                        f"and model.head=aspp (got {cfg.backbone}, {cfg.head})")
    if cfg.msc_features and cfg.head != "fc":
        raise UserError("model.msc_features (v1 MSc) needs model.head=fc on vgg16; set it false")
    if len(cfg.multi_grid) != 3 or any(not isinstance(r, int) or r < 1 for r in cfg.multi_grid):
        raise UserError(f"model.multi_grid={list(cfg.multi_grid)}: needs three rates (r1, r2, r3), positive "
                        "integers (one per unit of block4)")
    if cfg.output_stride not in supported_output_strides(cfg):
        raise UserError(f"model.output_stride={cfg.output_stride}: model.backbone={cfg.backbone} with "
                        f"{cfg.cascade_blocks} cascaded blocks supports "
                        f"{', '.join(map(str, supported_output_strides(cfg)))} (above 32, one cascaded block "
                        "strides per doubling: set model.cascade_blocks)")
    if cfg.backbone == "vgg16":
        if cfg.cascade_blocks:
            raise UserError("model.cascade_blocks copies ResNet's block4; set it to 0 for vgg16")
        if list(cfg.multi_grid) != [1, 1, 1]:
            raise UserError("model.multi_grid applies to ResNet's block4; leave it [1, 1, 1] for vgg16")
    else:
        if cfg.cascade_blocks < 0:
            raise UserError(f"model.cascade_blocks must be >= 0, got {cfg.cascade_blocks}")
    if any(int(r) != r or r < 1 for r in cfg.aspp_rates):
        raise UserError(f"model.aspp_rates must be positive integers, got {list(cfg.aspp_rates)}")
    if cfg.head in ("fc", "atrous_classifier") and not cfg.aspp_rates:
        raise UserError(f"model.aspp_rates must list at least one rate for model.head={cfg.head}")
    if cfg.head == "fc" and (cfg.fc6_kernel < 1 or cfg.fc6_width < 1):
        raise UserError(f"model.fc6_kernel and model.fc6_width must be >= 1, got {cfg.fc6_kernel}, {cfg.fc6_width}")
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.aspp_dropout < 1:
        raise UserError(f"model.dropout and model.aspp_dropout must be in [0, 1), got {cfg.dropout}, {cfg.aspp_dropout}")
    if any(s <= 0 for s in cfg.msc_scales):
        raise UserError(f"model.msc_scales must be positive, got {list(cfg.msc_scales)}")
    if cfg.aspp_channels < 1 or cfg.decoder_channels < 1 or cfg.decoder_convs < 0 or cfg.decoder_width < 1:
        raise UserError("model.aspp_channels, model.decoder_channels and model.decoder_width must be >= 1, "
                        "model.decoder_convs >= 0")
    if cfg.decoder_kernel < 1 or cfg.decoder_kernel % 2 == 0:
        raise UserError(f"model.decoder_kernel={cfg.decoder_kernel} must be an odd kernel size (1, 3, ...)")
    if cfg.generation == "v3plus":
        known = list(FEATURE_STRIDES)
        strides = [FEATURE_STRIDES.get(name) for name in cfg.decoder_features]
        if not cfg.decoder_features or None in strides or strides != sorted(strides, reverse=True):
            raise UserError(f"model.decoder_features={list(cfg.decoder_features)}: give low-level features coarse to "
                            f"fine, from {', '.join(known)} (the paper's decoder: [layer1])")
    if not 0 <= cfg.msc_dropout < 1:
        raise UserError(f"model.msc_dropout must be in [0, 1), got {cfg.msc_dropout}")
    if cfg.pool5_avg and cfg.head != "fc":
        raise UserError("model.pool5_avg is LargeFOV's average pooling before fc6: it needs model.head=fc")
    if cfg.bn not in BN_MODES:
        raise UserError(f"model.bn={cfg.bn!r} is unknown; choose one of {', '.join(BN_MODES)}")
    if not 0 <= cfg.bn_momentum <= 1:
        raise UserError(f"model.bn_momentum must be in [0, 1] (PyTorch convention), got {cfg.bn_momentum}")


def supported_output_strides(cfg) -> tuple[int, ...]:
    """Output strides the backbone of `cfg` can be trained or evaluated at (set_output_stride)."""
    if cfg.backbone == "vgg16":
        return (8,)
    return tuple(s for s in (8, 16, 32, 64, 128, 256) if s <= max_output_stride(max(0, cfg.cascade_blocks)))


def apply_trainable(model: nn.Module, prefixes) -> None:
    """`model.trainable`: only parameters whose names start with one of `prefixes` train (empty = all).
    v1's MSc stage trains the MSc MLPs and fc8 of a trained base network (v1 Sec. 4.3)."""
    if not prefixes:
        return
    for name, parameter in model.named_parameters():
        if not name.startswith(tuple(prefixes)):
            parameter.requires_grad_(False)


def build_model(model_cfg, num_classes: int) -> DeepLab:
    """The network of `model_cfg` (a `config.ModelConfig`), initialised per `model_cfg.pretrained`."""
    validate(model_cfg, num_classes)
    backbone = BACKBONES[model_cfg.backbone](model_cfg)
    model = GENERATIONS[model_cfg.generation](model_cfg, backbone, num_classes)
    load_pretrained(model, model_cfg)
    apply_trainable(model, model_cfg.trainable)
    return model
