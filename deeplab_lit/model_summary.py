"""What a run's network is: parameters (total and trainable), GMACs, strides, atrous rates, field of view.

Counting builds the network without weights (`model.pretrained` is ignored), so it needs no download
and no dataset. Used by `python -m deeplab_lit.summary`, the README model table and the report's
GPU-hour plan.
"""
from __future__ import annotations

import dataclasses

from deeplab_lit.config import RunSpec


def head_field_of_view(model_cfg, rates: list[int]) -> str:
    """Span in input pixels of the head's widest atrous kernel: ((k - 1) * rate + 1) * output stride."""
    kernel = model_cfg.fc6_kernel if model_cfg.head == "fc" else (1 if model_cfg.head == "classifier" else 3)
    if not rates or kernel == 1:
        return "1x1 head: the backbone's receptive field only"
    span = ((kernel - 1) * max(rates) + 1) * model_cfg.output_stride
    return (f"{kernel}x{kernel} kernel at rate {max(rates)} spans {span} px of the input at output stride "
            f"{model_cfg.output_stride}")


def build_for_counting(spec: RunSpec, device: str = "cpu"):
    import torch

    from deeplab_lit.models import build_model

    torch.manual_seed(0)
    model_cfg = dataclasses.replace(spec.config.model, pretrained="none")  # counting needs no weights
    with torch.device(device):
        return build_model(model_cfg, spec.dataset.num_classes).eval()


def summarize(spec: RunSpec, sizes: list[int] | None = None) -> dict:
    from deeplab_lit.models.complexity import count_macs, count_parameters

    config = spec.config
    model = build_for_counting(spec)
    sizes = sizes or sorted({config.data.crop_size, 513})
    rates = model.atrous_rates()
    head_rates = rates.get("head", []) if isinstance(rates, dict) else []
    return {
        "experiment": config.name,
        "generation": config.model.generation,
        "backbone": config.model.backbone,
        "head": config.model.head,
        "parameters": count_parameters(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gmacs": {f"{s}x{s}": round(count_macs(model, (s, s)) / 1e9, 2) for s in sizes},
        "crop_size": config.data.crop_size,
        "train_output_stride": config.model.output_stride,
        "eval_output_stride": spec.protocols[0].output_stride,
        "atrous_rates": rates,
        "field_of_view": head_field_of_view(config.model, list(head_rates) if isinstance(head_rates, (list, tuple))
                                            else []),
    }
