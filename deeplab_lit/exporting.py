"""A trained network as a standalone file: ONNX or TorchScript (what `python -m deeplab_lit.export` writes).

The exported graph (`ExportableSegmenter`) takes `image`: float32 N x 3 x H x W, RGB in 0..255 (not
normalised), any N, H and W (dynamic axes), and returns `logits`: float32 N x C x H x W at the input size.
Inside it:
- the dataset's normalisation (its mean and std, as in training);
- padding right and bottom with the mean colour to a multiple of the output stride (and of what a v2 MSC
  pyramid needs), then cropping the logits back: exactly `inference.predict_logits_whole`;
- the network at the run's evaluation output stride (`eval.output_stride`, else the training one), with a
  v2 network's own MSC pyramid (max-fused scales) since that is part of the network.
Not inside: the evaluation protocol's input scales and flip (`eval.scales`, `eval.flip`), the sliding window
(`eval.mode=slide`), the softmax/argmax and the dense CRF. Labels are `logits.argmax(1)`.

Exporters, as checked with torch 2.14: ONNX through `torch.onnx.export(dynamo=False)`, the TorchScript-based
exporter, opset 17 (the torch.export-based default needs the `onnxscript` package, which this project does
not depend on; the TorchScript path is deprecated in torch 2.14 but exports this network with dynamic height
and width; tests/test_predict_export.py checks onnxruntime against PyTorch at two sizes: probabilities
within 1e-4, logits within a few 1e-6 of their range, float32 rounding of a different summation order). TorchScript through `torch.jit.trace` (also deprecated in torch 2.14, still supported): the sizes
are traced as operations, so the file runs at any size; control flow that depends on values would be frozen,
and DeepLab has none. Both files run without this project: `onnxruntime.InferenceSession(path)` or
`torch.jit.load(path)`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deeplab_lit.errors import UserError
from deeplab_lit.preprocessing import normalise

EXPORT_FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
EXAMPLE_SIZE = (1, 3, 65, 81)  # traced at a size that is no stride multiple, so padding is part of the graph

# The exporters we use are deprecated in torch 2.14 (see the module docstring); their notices, and the tracer's
# notes on the shape comparisons that skip no-op resizes (which stay no-ops at every size), are not for users.
EXPORT_NOISE = (r"You are using the legacy TorchScript-based ONNX export", r"The feature will be removed",
                r"`torch\.jit\.(trace|trace_method|save)` is deprecated", r"Converting a tensor to a Python",
                r"Iterating over a tensor might cause the trace")


class ExportableSegmenter(nn.Module):
    """RGB 0..255 float N x 3 x H x W -> logits N x C x H x W (see the module docstring)."""

    def __init__(self, network: nn.Module, mean, std, multiple: int):
        super().__init__()
        self.network = network
        self.mean, self.std = tuple(mean), tuple(std)  # RGB 0..1, deeplab_lit.preprocessing's convention
        self.multiple = int(multiple)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = normalise(image, self.mean, self.std)  # the training normalisation, traced as constants
        height, width = x.shape[-2], x.shape[-1]
        pad_h = (self.multiple - height % self.multiple) % self.multiple
        pad_w = (self.multiple - width % self.multiple) % self.multiple
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)  # 0 = the mean colour after normalisation
        return self.network(x)["out"][:, :, :height, :width]


def exportable(segmenter) -> ExportableSegmenter:
    """The network of a loaded `api.Segmenter`, on CPU at its protocol's output stride, wrapped for export."""
    from deeplab_lit.inference import pad_multiple

    network = segmenter.model.to("cpu").eval()
    stride = segmenter.protocol.output_stride
    if stride and stride != network.output_stride:
        network.set_output_stride(stride)
    module = ExportableSegmenter(network, segmenter.mean, segmenter.std, pad_multiple(network)).eval()
    for parameter in module.parameters():  # an inference graph: outputs that need no .detach()
        parameter.requires_grad_(False)
    return module


def not_inside(segmenter) -> list[str]:
    """What of the run's protocol the exported graph leaves out (for the command's message)."""
    protocol, missing = segmenter.protocol, []
    if tuple(protocol.scales) != (1.0,):
        missing.append(f"eval.scales={list(protocol.scales)}")
    if protocol.flip:
        missing.append("eval.flip=true")
    if protocol.mode == "slide":
        missing.append(f"eval.mode=slide (crop {protocol.slide_crop}, stride {protocol.slide_stride})")
    if protocol.crf:
        missing.append("the dense CRF (crf.enabled)")
    return missing


def export(module: ExportableSegmenter, path: str | Path, fmt: str) -> Path:
    """Write `module` as ONNX or TorchScript to `path` (atomically)."""
    from deeplab_lit.files import atomic_write

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    example = torch.rand(EXAMPLE_SIZE) * 255
    with warnings.catch_warnings(), torch.no_grad():
        for message in EXPORT_NOISE:
            warnings.filterwarnings("ignore", message=message)
        if fmt == "onnx":
            axes = {0: "batch", 2: "height", 3: "width"}
            writer = lambda stream: torch.onnx.export(  # noqa: E731
                module, (example,), stream, dynamo=False, opset_version=ONNX_OPSET, input_names=["image"],
                output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
        else:
            traced = torch.jit.trace(module, (example,), check_trace=False)
            writer = lambda stream: torch.jit.save(traced, stream)  # noqa: E731
        return atomic_write(path, writer)
