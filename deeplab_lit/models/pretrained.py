"""Initialisation from ImageNet (torchvision's or timm's weights) or from a state dict file. Never downloads.

`model.pretrained`:
- `none`: random initialisation.
- `imagenet`: for vgg16 / resnet50 / resnet101 torchvision's IMAGENET1K_V1 file, read from the local
  torch hub cache (`torch.hub.get_dir()/checkpoints/<file>`, where torchvision itself stores it). For
  xception65 / xception71 timm's `<variant>.tf_in1k` (TF DeepLab's ImageNet checkpoint, ported), for
  `timm:<name>[.<tag>]` timm's weights of that tag (default: timm's default tag), read from the Hugging
  Face hub cache where timm 1.0 stores them (`huggingface_hub.try_to_load_from_cache`, which never goes
  online: `$HF_HUB_CACHE`, by default `~/.cache/huggingface/hub/models--timm--<name>.<tag>/snapshots/
  <revision>/model.safetensors`). Absent -> UserError saying how to fetch it once.
- a PATH: a torchvision-format ImageNet state dict of the backbone (e.g. a copy of that file); for
  xception and timm backbones a timm state dict (`timm.create_model(...).state_dict()`, `.pth`/`.bin`
  or `.safetensors`; the classifier is ignored); or a DeepLab state dict of this project (keys
  `backbone.*`, `head.*`; a Lightning checkpoint's `state_dict` with its `model.` prefix works too),
  e.g. a COCO-pretrained model. From our own format every tensor whose name and shape match is
  loaded; the rest (typically the classifier when the number of classes differs) keeps its
  initialisation and is listed in a warning. Files are read as data only (`weights_only=True`,
  safetensors).

VGG-16 conversion (v1 Sec. 3.1): convolutions copied as they are; fc6 from torchvision's
`classifier.0` (4096 x 25088) reshaped to 4096 x 512 x 7 x 7 and spatially decimated to the head's
kernel by `decimation_indices`: 7 -> all, 4 -> [0, 2, 4, 6], 3 -> [0, 3, 6] (evenly spaced from the
first to the last tap, so the decimated kernel spans the same extent; with the matching rates this is
exact: 3x3 r12 samples the taps of 7x7 r4 at offsets 0, 12, 24), 1 -> [3]; fc7 from `classifier.3`
as a 1x1 conv. For a width below 4096 (LargeFOV: 1024) we keep every (4096 / width)-th filter
(0, 4, 8, ...) of fc6, and the same subset of fc7 in both dimensions (its inputs are fc6's kept
filters); biases likewise. The paper says only "a subset"; a regular subsample is our choice. Every
branch of a VGG ASPP gets the same fc6/fc7 initialisation.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Optional

import torch
from torchvision.models import ResNet50_Weights, ResNet101_Weights, VGG16_Weights

from deeplab_lit.errors import UserError
from deeplab_lit.models.backbones.vgg import VGG16Atrous
from deeplab_lit.models.backbones.xception import IMAGENET_TAG as XCEPTION_IMAGENET_TAG
from deeplab_lit.models.backbones.xception import VARIANTS as XCEPTION_VARIANTS
from deeplab_lit.models.heads.fc import FCHead

log = logging.getLogger(__name__)

IMAGENET_WEIGHTS = {
    "vgg16": VGG16_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": ResNet101_Weights.IMAGENET1K_V1,
}
VGG_FC_WIDTH, VGG_FC_KERNEL = 4096, 7
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm 1.0 reads from a Hugging Face repo


def timm_weights(backbone: str) -> Optional[str]:
    """The timm `name.tag` whose weights `imagenet` means for `backbone`; None for torchvision's backbones."""
    if backbone in XCEPTION_VARIANTS:
        return f"{backbone}.{XCEPTION_IMAGENET_TAG}"
    if backbone.startswith("timm:"):
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone[len("timm:"):])
        if cfg is None:
            raise UserError(f"model.pretrained=imagenet: timm has no pretrained weights for {backbone}; set "
                            "model.pretrained=none or a PATH to a timm state dict")
        return f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    return None


def imagenet_source(backbone: str) -> str:
    """Whose ImageNet weights `imagenet` loads, for records: 'torchvision' or 'timm xception65.tf_in1k'."""
    weights = timm_weights(backbone)
    return f"timm {weights}" if weights else "torchvision"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache timm downloads into ($HF_HUB_CACHE, ~/.cache/huggingface/hub by default)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _timm_imagenet_file(weights: str) -> Path:
    """The cached file of timm's `weights`, or (absent) its repository's cache directory. Offline only."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(weights)
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(f"model.pretrained=imagenet: timm's {weights} has no Hugging Face weights to read from the "
                        "cache; set model.pretrained=PATH to a timm state dict or none")
    repo = cfg.hf_hub_id.split("@")[0]
    for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else HF_FILES):
        found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
        if isinstance(found, str):
            return Path(found)
    return hf_cache_dir() / f"models--{repo.replace('/', '--')}"


def imagenet_checkpoint(backbone: str) -> Path:
    """Where the ImageNet weights of `backbone` are cached: torchvision's IMAGENET1K_V1 file in the torch
    hub cache (the file name of its URL), or timm's file in the Hugging Face cache (if absent: the
    directory it would be in)."""
    weights = timm_weights(backbone)
    if weights:
        return _timm_imagenet_file(weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_WEIGHTS[backbone].url.rsplit("/", 1)[-1]


def decimation_indices(kernel: int, source: int = VGG_FC_KERNEL) -> list[int]:
    if not 1 <= kernel <= source:
        raise UserError(f"model.fc6_kernel={kernel} cannot be decimated from VGG-16's {source}x{source} fc6; "
                        f"use a kernel of 1..{source} or model.pretrained=none")
    if kernel == 1:
        return [source // 2]
    return torch.linspace(0, source - 1, kernel).round().long().tolist()


def filter_indices(width: int, source: int = VGG_FC_WIDTH) -> list[int]:
    if width > source or source % width:
        raise UserError(f"model.fc6_width={width} cannot be taken from VGG-16's {source} fc filters; "
                        f"use a divisor of {source} (e.g. 1024, 4096) or model.pretrained=none")
    return list(range(0, source, source // width))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise UserError(f"model.pretrained: cannot read {path} as a safetensors state dict ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.pretrained: cannot read {path} as a PyTorch state dict ({first_line}); "
                        "give a file saved with torch.save(model.state_dict())") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.pretrained: {path} does not hold a state dict (name -> tensor)")
    if not any(k.startswith("backbone.") for k in obj) and any(k.startswith("model.backbone.") for k in obj):
        obj = {k[len("model."):]: v for k, v in obj.items() if k.startswith("model.")}
    return obj


def convert_vgg16_imagenet(vgg_state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """torchvision `vgg16` state dict -> this model's keys (backbone convs, fc heads' fc6/fc7)."""
    converted = {f"backbone.{k}": v for k, v in vgg_state.items() if k.startswith("features.")}
    if isinstance(model.head, FCHead):
        rows = filter_indices(model.head.width)
        taps = decimation_indices(model.head.kernel)
        fc6 = vgg_state["classifier.0.weight"].view(VGG_FC_WIDTH, 512, VGG_FC_KERNEL, VGG_FC_KERNEL)
        fc6 = fc6[rows][:, :, taps][:, :, :, taps]
        fc7 = vgg_state["classifier.3.weight"][rows][:, rows].reshape(len(rows), len(rows), 1, 1)
        for i in range(len(model.head.branches)):
            prefix = f"head.branches.{i}"
            converted[f"{prefix}.fc6.weight"] = fc6.clone()
            converted[f"{prefix}.fc6.bias"] = vgg_state["classifier.0.bias"][rows].clone()
            converted[f"{prefix}.fc7.weight"] = fc7.clone()
            converted[f"{prefix}.fc7.bias"] = vgg_state["classifier.3.bias"][rows].clone()
    return converted


def _load_torchvision(model, state: dict[str, torch.Tensor], path: Path, backbone_name: str) -> None:
    backbone = model.backbone
    if isinstance(backbone, VGG16Atrous):
        needed = ["features.0.weight", "classifier.0.weight", "classifier.3.weight"]
        if any(k not in state for k in needed):
            raise UserError(f"model.pretrained: {path} is not a torchvision vgg16 state dict "
                            f"(needs {', '.join(needed)})")
        converted = convert_vgg16_imagenet(state, model)
        expected = [k for k in model.state_dict() if k.startswith("backbone.")] + [
            k for k in converted if k.startswith("head.")]
    else:
        converted = {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        cascade = tuple(f"backbone.{name}." for name in backbone.cascade_names)
        expected = [k for k in model.state_dict() if k.startswith("backbone.") and not k.startswith(cascade)]
    # ImageNet files saved before PyTorch 0.4.1 have no BN `num_batches_tracked`; BN fills it in.
    missing = sorted(k for k in set(expected) - set(converted) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(converted) - set(model.state_dict()))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"model.pretrained: {path} does not match a torchvision {backbone_name} state dict "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {example})")
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as err:
        raise UserError(f"model.pretrained: {path} has tensors of the wrong shape for {backbone_name} "
                        f"({str(err).splitlines()[-1].strip()})") from None


def _widened_input(own: torch.Tensor, theirs: torch.Tensor) -> bool:
    """A conv weight whose input channels grew (v1 MSc: fc8 sees fc7 + 640 MSc channels): copyable into the
    leading input channels."""
    return (own.dim() == theirs.dim() == 4 and own.shape[0] == theirs.shape[0] and own.shape[2:] == theirs.shape[2:]
            and own.shape[1] > theirs.shape[1])


def _load_deeplab(model, state: dict[str, torch.Tensor], path: Path) -> None:
    """Our own format: every tensor whose name and shape match; a conv weight whose input channels grew
    gets the stored weights in its leading input channels and keeps its initialisation for the new ones
    (so a v1 MSc network starts from its base network's fc8, as the released MSc prototxt does)."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    widened = {k: v for k, v in state.items() if k in own and k not in matched and _widened_input(own[k], v)}
    if not matched:
        raise UserError(f"model.pretrained: no tensor of {path} matches this model's names and shapes")
    for key, value in widened.items():
        merged = own[key].clone()
        merged[:, : value.shape[1]] = value
        matched[key] = merged
    mismatched = sorted(k for k in state if k in own and k not in matched)
    missing = sorted(set(own) - set(matched))
    model.load_state_dict(matched, strict=False)
    if mismatched or missing:
        log.warning("model.pretrained=%s: loaded %d of %d tensors (%d widened); kept the initialisation of %s",
                 path, len(matched), len(own), len(widened), ", ".join((mismatched + missing)[:8])
                 + (" ..." if len(mismatched + missing) > 8 else ""))


def _load_timm(model, state: dict[str, torch.Tensor], path: Path, backbone_name: str) -> None:
    """A timm state dict into an xception / timm backbone whose keys are timm's under `timm_state_prefix`."""
    backbone = model.backbone
    own = backbone.state_dict()
    converted = {backbone.timm_state_prefix + k: v for k, v in state.items()}
    missing = sorted(k for k in set(own) - set(converted) if not k.endswith("num_batches_tracked"))
    wrong = sorted(k for k in set(own) & set(converted) if own[k].shape != converted[k].shape)
    if missing or wrong:
        example = (missing or wrong)[0]
        raise UserError(f"model.pretrained: {path} does not match timm's {backbone_name} ({len(missing)} missing "
                        f"keys, {len(wrong)} of another shape, e.g. {example}); give a state dict of that timm model")
    backbone.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False)
    ignored = sorted(set(converted) - set(own))
    if ignored:
        log.info("model.pretrained=%s: ignored %d tensors timm's classifier/head holds (%s)", path, len(ignored),
                 ", ".join(ignored[:4]))


def load_pretrained(model, model_cfg) -> None:
    """Apply `model_cfg.pretrained` to `model` in place (see the module docstring)."""
    source = model_cfg.pretrained
    if source == "none":
        return
    if source == "imagenet":
        path = imagenet_checkpoint(model_cfg.backbone)
        weights = timm_weights(model_cfg.backbone)
        if not path.is_file() and weights:
            raise UserError(
                f"model.pretrained=imagenet: timm's ImageNet weights {weights} for {model_cfg.backbone} are not in the "
                f"Hugging Face cache ({path}); fetch them once with internet: python -c \"import timm; "
                f"timm.create_model('{weights}', pretrained=True)\" (or set model.pretrained=PATH or none)")
        if not path.is_file():
            raise UserError(
                f"model.pretrained=imagenet: ImageNet weights for {model_cfg.backbone} not found at {path}; "
                "fetch them once with internet: python -c \"import torchvision; "
                f"torchvision.models.{model_cfg.backbone}(weights='IMAGENET1K_V1')\" "
                "(or set model.pretrained=PATH or none)")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"model.pretrained: file {path} not found; give an existing state dict file, "
                            "'imagenet' or 'none'")
    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state):
        _load_deeplab(model, state, path)
    elif hasattr(model.backbone, "timm_state_prefix"):
        _load_timm(model, state, path, timm_weights(model_cfg.backbone) if source == "imagenet"
                   else model_cfg.backbone.removeprefix("timm:"))
    else:
        _load_torchvision(model, state, path, model_cfg.backbone)
    model.init_source = f"imagenet:{path}" if source == "imagenet" else str(path)
