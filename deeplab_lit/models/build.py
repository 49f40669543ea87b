"""`build_model(cfg.model, num_classes)`: registries of backbones, heads and generations.

A new backbone or head is one file plus one `register` line in `BACKBONES` / `HEADS` (registry.py);
the config's allowed names and `--help` come from these registries. A backbone entry is a
`BackboneSpec` (backbones/specs.py): it builds the backbone and says what it supports (output strides,
the v3+ stride-4 feature, multi-grid, cascaded blocks), which `validate` reads; `timm:<name>` is a
family whose specs are read from timm. A generation builder
composes backbone and head into a `DeepLab`: v1, v2 and v3 put the configured head on the backbone
(v2 adds the MSC pyramid through `msc_scales`); v3plus wraps the v3 ASPP into the decoder head.
Combinations that cannot work are refused with a UserError naming the key.
"""
from __future__ import annotations

from typing import Callable

from deeplab_lit.errors import UserError
from deeplab_lit.models.batchnorm import BN_MODES
from torch import nn

from deeplab_lit.models.backbones.specs import BackboneSpec, ResNetSpec, TimmSpec, VGGSpec, XceptionSpec
from deeplab_lit.models.deeplab import DeepLab
from deeplab_lit.models.heads import ASPP, ASPPHead, AtrousClassifierHead, ClassifierHead, DecoderHead, FCHead
from deeplab_lit.models.pretrained import load_pretrained
from deeplab_lit.registry import Registry


BACKBONES: Registry[BackboneSpec] = Registry("model.backbone")
BACKBONES.register("vgg16", VGGSpec(), "DeepLab's atrous VGG-16 (output stride 8)")
BACKBONES.register("resnet50", ResNetSpec(50), "torchvision ResNet-50, output stride 8/16/32, multi-grid, cascade")
BACKBONES.register("resnet101", ResNetSpec(101), "torchvision ResNet-101, output stride 8/16/32, multi-grid, cascade")
BACKBONES.register("xception65", XceptionSpec("xception65"),
                   "v3+'s modified aligned Xception-65 (timm's, TF DeepLab's rates), output stride 8/16/32")
BACKBONES.register("xception71", XceptionSpec("xception71"),
                   "aligned Xception-71 (v3+ Table 7's X-71; timm's), output stride 8/16/32")
BACKBONES.register_family("timm:", TimmSpec.for_name,
                          "any timm model with output_stride and forward_intermediates, e.g. timm:resnet50d")


def build_aspp(cfg, backbone) -> ASPP:
    return ASPP(backbone.out_channels, rates=list(cfg.aspp_rates), channels=cfg.aspp_channels,
                image_pooling=cfg.image_pooling, rates_absolute=cfg.aspp_rates_absolute,
                dropout=cfg.aspp_dropout, output_stride=backbone.output_stride, separable=cfg.separable)


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
                   bn_mode=cfg.bn, bn_momentum=cfg.bn_momentum, align_corners=cfg.align_corners)


def _backbone_and_head(cfg, backbone, num_classes) -> DeepLab:
    return _deeplab(cfg, backbone, HEADS[cfg.head](cfg, backbone, num_classes))


def _v3plus(cfg, backbone, num_classes) -> DeepLab:
    names = list(cfg.decoder_features) or [backbone.low_level_feature]
    head = DecoderHead(build_aspp(cfg, backbone), num_classes,
                       features=[(name, backbone.feature_channels[name]) for name in names],
                       logits_stride=backbone.feature_strides[names[-1]],
                       decoder_channels=cfg.decoder_channels, decoder_convs=cfg.decoder_convs,
                       decoder_width=cfg.decoder_width, decoder_kernel=cfg.decoder_kernel, separable=cfg.separable,
                       align_corners=cfg.align_corners)
    return _deeplab(cfg, backbone, head)


GENERATIONS: Registry[Callable] = Registry("model.generation")
GENERATIONS.register("v1", _backbone_and_head, "DeepLab v1: VGG-16, fc head, loss at stride 8")
GENERATIONS.register("v2", _backbone_and_head, "DeepLab v2: VGG-16 or ResNet, ASPP by summed logits, MSC")
GENERATIONS.register("v3", _backbone_and_head, "DeepLab v3: ResNet, ASPP with BatchNorm and image pooling")
GENERATIONS.register("v3plus", _v3plus, "DeepLab v3+: the v3 encoder and a decoder on the stride-4 feature")


def validate(cfg, num_classes: int) -> None:
    """Refuse networks the zoo cannot build, naming the key and what to do (the rules live here only)."""
    GENERATIONS[cfg.generation]
    spec = BACKBONES[cfg.backbone]  # timm:<name>: a name timm does not know is refused here
    HEADS[cfg.head]
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if cfg.head == "fc" and cfg.backbone != "vgg16":
        raise UserError(f"model.head=fc needs model.backbone=vgg16 (fc6/fc7 are VGG-16's fully connected "
                        f"layers), got {cfg.backbone}; ResNet heads are classifier, atrous_classifier, aspp")
    if cfg.generation == "v1" and (cfg.backbone != "vgg16" or cfg.head != "fc"):
        raise UserError("model.generation=v1 is VGG-16 with the fc head: set model.backbone=vgg16 and "
                        f"model.head=fc (got {cfg.backbone}, {cfg.head})")
    if cfg.generation == "v3plus" and (cfg.head != "aspp" or (
            cfg.output_stride in spec.output_strides(cfg.cascade_blocks) and not spec.has_low_level(cfg.output_stride))):
        raise UserError("model.generation=v3plus needs a backbone that provides a stride-4 feature for the decoder "
                        "(resnet50/101: layer1, xception65/71: TF's entry-flow end point, timm: its stride-4 stage) "
                        f"and model.head=aspp (got {cfg.backbone}, {cfg.head})")
    if cfg.separable and cfg.head != "aspp":
        raise UserError(f"model.separable=true makes the aspp head's (and the v3+ decoder's) 3x3 convs separable; "
                        f"model.head={cfg.head} has none: set model.separable=false")
    if cfg.separable and cfg.decoder_kernel != 3:
        raise UserError(f"model.separable=true makes the decoder's convs depthwise 3x3; model.decoder_kernel="
                        f"{cfg.decoder_kernel} needs model.separable=false")
    if cfg.msc_features and cfg.head != "fc":
        raise UserError("model.msc_features (v1 MSc) needs model.head=fc on vgg16; set it false")
    if len(cfg.multi_grid) != 3 or any(not isinstance(r, int) or r < 1 for r in cfg.multi_grid):
        raise UserError(f"model.multi_grid={list(cfg.multi_grid)}: needs three rates (r1, r2, r3), positive "
                        "integers (one per unit of block4)")
    if cfg.output_stride not in spec.output_strides(cfg.cascade_blocks):
        raise UserError(f"model.backbone={cfg.backbone} cannot give model.output_stride={cfg.output_stride}: "
                        f"{spec.output_stride_refusal(cfg.output_stride, cfg.cascade_blocks)}")
    if cfg.backbone == "vgg16":
        if cfg.cascade_blocks:
            raise UserError("model.cascade_blocks copies ResNet's block4; set it to 0 for vgg16")
        if list(cfg.multi_grid) != [1, 1, 1]:
            raise UserError("model.multi_grid applies to ResNet's block4; leave it [1, 1, 1] for vgg16")
    else:
        if cfg.cascade_blocks < 0:
            raise UserError(f"model.cascade_blocks must be >= 0, got {cfg.cascade_blocks}")
        if cfg.cascade_blocks and not spec.cascade:
            raise UserError(f"model.cascade_blocks copies ResNet's block4 (resnet50, resnet101); set it to 0 for "
                            f"{cfg.backbone}")
        if list(cfg.multi_grid) != [1, 1, 1] and spec.multi_grid_refusal():
            raise UserError(f"model.multi_grid={list(cfg.multi_grid)}: model.backbone={cfg.backbone} cannot apply "
                            f"multi-grid ({spec.multi_grid_refusal()}); leave it [1, 1, 1]")
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
    if cfg.generation == "v3plus" and cfg.decoder_features:
        known = spec.decoder_features
        strides = [known.get(name) for name in cfg.decoder_features]
        if not known:
            raise UserError(f"model.decoder_features={list(cfg.decoder_features)}: model.backbone={cfg.backbone} offers "
                            "only its stride-4 feature; leave model.decoder_features empty")
        if None in strides or strides != sorted(set(strides), reverse=True):
            raise UserError(f"model.decoder_features={list(cfg.decoder_features)}: give low-level features coarse to "
                            f"fine, from {', '.join(known)} (empty = the paper's decoder, [layer1])")
    if not 0 <= cfg.msc_dropout < 1:
        raise UserError(f"model.msc_dropout must be in [0, 1), got {cfg.msc_dropout}")
    if cfg.pool5_avg and cfg.head != "fc":
        raise UserError("model.pool5_avg is LargeFOV's average pooling before fc6: it needs model.head=fc")
    if cfg.bn not in BN_MODES:
        raise UserError(f"model.bn={cfg.bn!r} is unknown; choose one of {', '.join(BN_MODES)}")
    if not 0 <= cfg.bn_momentum <= 1:
        raise UserError(f"model.bn_momentum must be in [0, 1] (PyTorch convention), got {cfg.bn_momentum}")


def supported_output_strides(cfg) -> tuple[int, ...]:
    """Output strides the backbone of `cfg`, trained at `cfg.output_stride`, can be evaluated at
    (switched in place by set_output_stride): VGG-16 8; ResNets 8, 16, 32 (up to 32 x 2^cascaded blocks);
    Xceptions 8, 16, 32; timm models those whose layout timm's construction at that stride shares with the
    training one."""
    return BACKBONES[cfg.backbone].eval_output_strides(cfg.output_stride, cfg.cascade_blocks)


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
