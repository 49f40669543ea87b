"""LightningModules: one base and one per DeepLab generation (its paper's loss)."""
from deeplab_lit.modules.base import SegmentationModule
from deeplab_lit.modules.v1 import V1Module
from deeplab_lit.modules.v2 import V2Module
from deeplab_lit.modules.v3 import V3Module

MODULES = {"v1": V1Module, "v2": V2Module, "v3": V3Module, "v3plus": V3Module}


def build_module(cfg, num_classes: int, class_names) -> SegmentationModule:
    from deeplab_lit.config import to_dict

    return MODULES[cfg.model.generation](to_dict(cfg), num_classes, list(class_names))


def load_module(checkpoint_path: str, map_location="cpu") -> SegmentationModule:
    """Rebuild the module of a checkpoint written by `fit` (its generation from the stored config)."""
    import torch

    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    module = MODULES[hparams["config"]["model"]["generation"]](
        hparams["config"], hparams["num_classes"], hparams["class_names"]
    )
    module.load_state_dict(checkpoint["state_dict"])
    return module
