"""Whole-image, sliding-window, multi-scale and flipped prediction, as the papers evaluate.

Every strategy returns class probabilities at the input's full size; the ground truth is never
resized. Images arrive normalised, so padding with 0 is padding with the dataset's mean colour.

- whole: pad right and bottom to a multiple of what the network needs (its output stride, and for
  the v2 MSC pyramid a multiple that every scale keeps aligned), predict, crop the logits back.
- canvas (`eval.canvas`): first pad the image right and bottom to at least [height, width] with the
  mean colour, as TF DeepLab's evaluation (`eval_crop_size` 513 on VOC, 1025 x 2049 on Cityscapes)
  and the Caffe test prototxts (crop 513) do; the network then sees exactly that canvas (image
  pooling averages over it, padding included), scales resize the whole canvas, and the probabilities
  are cropped back to the image at the end.
- slide: windows of `slide_crop` every `slide_stride` pixels (the last window flush with the border),
  each predicted whole, logits averaged where windows overlap (Cityscapes, v2 Table 9).
- scales / flip: the softmax probabilities of every scale (image resized bilinearly with the model's
  `align_corners`, to TF's `scale_dimension` size on the corner-aligned grid: 513 -> 385 at 0.75) and of
  its horizontal flip, each resized back to the full image, averaged (v3 Table 6, v3+ Table 3). Scale 1
  without flip resizes nothing, so it is exactly the plain prediction.
- output stride: `evaluation_output_stride(model, os)` switches the dilations in place for the
  evaluation only and restores the training stride afterwards (v3 Table 10, v3+ Table 3).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from deeplab_lit.models.resize import resize_bilinear, scaled_length
from deeplab_lit.protocols import Protocol


def pad_multiple(model) -> int:
    """The smallest multiple of the output stride that every input scale of the model keeps aligned."""
    stride = model.output_stride
    scales = [s for s in getattr(model, "msc_scales", None) or [1.0]]
    multiple = stride
    while any(abs(multiple * s / stride - round(multiple * s / stride)) > 1e-6 for s in scales):
        multiple += stride
    return multiple


@contextlib.contextmanager
def evaluation_output_stride(model, output_stride: Optional[int]):
    """Switch the model to `output_stride` (same weights) inside the block, then restore it."""
    original = model.output_stride
    if output_stride and output_stride != original:
        model.set_output_stride(output_stride)
    try:
        yield model
    finally:
        if model.output_stride != original:
            model.set_output_stride(original)


def pad_bottom_right(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad with 0 (the mean colour after normalisation) to at least height x width."""
    pad_h, pad_w = max(0, height - images.shape[-2]), max(0, width - images.shape[-1])
    return F.pad(images, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else images


def predict_logits_whole(model, images: torch.Tensor, align: bool = True) -> torch.Tensor:
    """Logits at the input size: pad with the mean colour (0 after normalisation) to the alignment the
    network wants (unless `align` is False: a canvas is evaluated as it is), predict, crop."""
    height, width = images.shape[-2:]
    multiple = pad_multiple(model) if align else 1
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    padded = F.pad(images, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else images
    logits = model(padded)["out"]
    return logits[..., :height, :width]


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    return starts + [length - crop]


def predict_logits_slide(model, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Average of whole-window logits over overlapping `crop` windows every `stride` pixels."""
    height, width = images.shape[-2:]
    total = None
    count = torch.zeros((1, 1, height, width), device=images.device)
    for top in _window_starts(height, crop, stride):
        for left in _window_starts(width, crop, stride):
            window = images[..., top : top + crop, left : left + crop]
            logits = predict_logits_whole(model, window)
            if total is None:
                total = images.new_zeros((images.shape[0], logits.shape[1], height, width), dtype=logits.dtype)
            total[..., top : top + crop, left : left + crop] += logits
            count[..., top : top + crop, left : left + crop] += 1
    return total / count.to(total.dtype)


def predict_probs(model, images: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """Softmax probabilities N x C x H x W under `protocol` (canvas, scales, flip, whole or slide)."""
    original = images.shape[-2:]
    if protocol.canvas:
        images = pad_bottom_right(images, *protocol.canvas)
    height, width = images.shape[-2:]
    align = model.align_corners
    with evaluation_output_stride(model, protocol.output_stride):
        probs_sum = None
        count = 0
        for scale in protocol.scales:
            scaled = images
            if scale != 1.0:
                size = (scaled_length(height, scale, align), scaled_length(width, scale, align))
                scaled = resize_bilinear(images, size, align)
            for flipped in [False, True] if protocol.flip else [False]:
                inputs = scaled.flip(-1) if flipped else scaled
                if protocol.mode == "slide":
                    logits = predict_logits_slide(model, inputs, protocol.slide_crop, protocol.slide_stride)
                else:
                    logits = predict_logits_whole(model, inputs, align=not protocol.canvas)
                if flipped:
                    logits = logits.flip(-1)
                logits = resize_bilinear(logits, (height, width), align)
                probs = logits.float().softmax(dim=1)
                probs_sum = probs if probs_sum is None else probs_sum + probs
                count += 1
    probs = probs_sum / count if count > 1 else probs_sum
    return probs[..., : original[0], : original[1]]
