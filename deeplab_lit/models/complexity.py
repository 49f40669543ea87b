"""Model size and compute: parameters and multiply-accumulates (MACs) of one forward pass.

MACs are counted by `torch.utils.flop_counter.FlopCounterMode`, which counts the FLOPs of
convolutions and matrix products (2 per multiply-add) and nothing else (no BN, ReLU, pooling,
interpolation, bias additions); MACs = FLOPs / 2. Counting runs the real forward on the model's own
device (a model built under `torch.device("meta")` counts without computing anything), in eval mode
(so a v2 MSC model counts its three scales, and dropout is off), batch 1.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Every parameter, trainable or frozen."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one eval-mode forward of a 1 x 3 x H x W input."""
    height, width = input_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, height, width, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
