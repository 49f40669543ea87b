"""python -m deeplab_lit.export --checkpoint PATH --format onnx|torchscript --out FILE [--eval.output_stride=8]

Writes the trained network as one file that runs without this project: input `image` float32 N x 3 x H x W,
RGB 0..255, any size; output `logits` N x C x H x W at the input size (labels = argmax over C). Inside: the
dataset's normalisation, mean-colour padding to the output stride, the network (with a v2 MSC pyramid) at
the run's evaluation output stride. Not inside: multi-scale and flipped inputs, the sliding window, the
dense CRF (use `python -m deeplab_lit.predict` or `deeplab_lit.load_checkpoint` for those).
"""
from __future__ import annotations

from pathlib import Path

from deeplab_lit.cli import parser as command_parser
from deeplab_lit.cli import run
from deeplab_lit.config import split_overrides


def parse_args(argv):
    from deeplab_lit.exporting import EXPORT_FORMATS

    parser = command_parser("python -m deeplab_lit.export", __doc__)
    parser.add_argument("--checkpoint", required=True, help="model.pt (or last.ckpt, best-on-val.pt) of a run")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--out", required=True, metavar="FILE", help="e.g. model.onnx or model.torchscript.pt")
    args, rest = parser.parse_known_args(argv)
    return args, split_overrides(rest)


def main(argv: list[str]) -> int:
    from deeplab_lit.api import load_checkpoint
    from deeplab_lit.exporting import export, exportable, not_inside
    from deeplab_lit.files import check_writable

    args, overrides = parse_args(argv)
    check_writable(args.out, "--out")
    segmenter = load_checkpoint(args.checkpoint, device="cpu", overrides=overrides)
    module = exportable(segmenter)
    path = export(module, Path(args.out), args.format)
    print(f"wrote {path}: {segmenter.spec.name} ({segmenter.weights} weights, step {segmenter.step}), "
          f"{segmenter.num_classes} classes, output stride {module.network.output_stride}; input image float32 "
          "N x 3 x H x W RGB 0..255, output logits N x C x H x W")
    missing = not_inside(segmenter)
    if missing:
        print(f"not inside the exported graph (the run's protocol has them): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    run(main)
