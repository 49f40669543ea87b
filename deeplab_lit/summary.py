"""python -m deeplab_lit.summary --experiment NAME [--json] [--section.key=value ...]

Parameters, GMACs (multiply-adds counted by torch.utils.flop_counter, batch 1, at the experiment's
crop and at 513x513), train and eval output stride, the atrous rates the built network actually uses
(read from its modules), and the field of view of the head. Used by the README model table and by
the report's GPU-hour estimates.
"""
from __future__ import annotations

import argparse
import json

from deeplab_lit.cli import run, split_overrides
from deeplab_lit.config import Config, load_experiment

def num_classes_of(cfg: Config) -> int:
    """From the DataModule class itself: counting needs no dataset on disk."""
    from datamodules import DATAMODULES

    return DATAMODULES[cfg.data.name].num_classes


def head_field_of_view(cfg: Config, rates: list[int]) -> str:
    """Span in input pixels of the head's widest atrous kernel: ((k - 1) * rate + 1) * output stride."""
    kernel = cfg.model.fc6_kernel if cfg.model.head == "fc" else (1 if cfg.model.head == "classifier" else 3)
    if not rates or kernel == 1:
        return "1x1 head: the backbone's receptive field only"
    span = ((kernel - 1) * max(rates) + 1) * cfg.model.output_stride
    return f"{kernel}x{kernel} kernel at rate {max(rates)} spans {span} px of the input at output stride {cfg.model.output_stride}"


def summarize(cfg: Config, sizes: list[int] | None = None) -> dict:
    import torch

    from deeplab_lit.models import build_model
    from deeplab_lit.models.complexity import count_macs, count_parameters

    torch.manual_seed(0)
    model_cfg = cfg.model
    model_cfg.pretrained = "none"  # counting needs no weights
    model = build_model(model_cfg, num_classes_of(cfg)).eval()
    sizes = sizes or sorted({cfg.data.crop_size, 513})
    rates = model.atrous_rates()
    head_rates = rates.get("head", rates.get("aspp", [])) if isinstance(rates, dict) else []
    return {
        "experiment": cfg.name,
        "generation": cfg.model.generation,
        "backbone": cfg.model.backbone,
        "head": cfg.model.head,
        "parameters": count_parameters(model),
        "gmacs": {f"{s}x{s}": round(count_macs(model, (s, s)) / 1e9, 2) for s in sizes},
        "crop_size": cfg.data.crop_size,
        "train_output_stride": cfg.model.output_stride,
        "eval_output_stride": cfg.eval.output_stride or cfg.model.output_stride,
        "atrous_rates": rates,
        "field_of_view": head_field_of_view(cfg, list(head_rates) if isinstance(head_rates, (list, tuple)) else []),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m deeplab_lit.summary", description=__doc__.split("\n\n")[1])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--sizes", type=int, nargs="+", help="input sizes for GMACs (default: crop and 513)")
    args, rest = parser.parse_known_args(argv)
    cfg = load_experiment(args.experiment, split_overrides(rest))
    info = summarize(cfg, args.sizes)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['experiment']}: {info['generation']} {info['backbone']} head={info['head']}")
    print(f"  parameters      {info['parameters'] / 1e6:.2f} M")
    for size, gmacs in info["gmacs"].items():
        print(f"  GMACs @ {size:<9}{gmacs:.2f}")
    print(f"  output stride   train {info['train_output_stride']}, eval {info['eval_output_stride']}")
    print(f"  atrous rates    {info['atrous_rates']}")
    print(f"  field of view   {info['field_of_view']}")
    return 0


if __name__ == "__main__":
    run(main)
