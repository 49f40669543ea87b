"""The DeepLab model zoo: plain nn.Modules (no Lightning, no data, no config files).

`build_model(cfg.model, num_classes)` is the entry point; see build.py for the registries and
deeplab.py for the output dict.
"""
from deeplab_lit.models.batchnorm import BN_MODES
from deeplab_lit.models.build import BACKBONES, GENERATIONS, HEADS, build_model, supported_output_strides, validate
from deeplab_lit.models.complexity import count_macs, count_parameters
from deeplab_lit.models.deeplab import DeepLab
from deeplab_lit.models.pretrained import imagenet_checkpoint, imagenet_source

__all__ = ["BACKBONES", "BN_MODES", "GENERATIONS", "HEADS", "DeepLab", "build_model", "count_macs", "count_parameters",
           "imagenet_checkpoint", "imagenet_source", "supported_output_strides", "validate"]
