"""python -m deeplab_lit.predict --checkpoint PATH (--input DIR|FILE|GLOB | --split NAME) --out DIR [--format F]

Segments images with a trained model and writes one output per image at the image's own size:
`index` (palette PNG of class indices, the default), `color`, `overlay`, `voc` (the VOC evaluation
server's results/VOC2012/Segmentation/comp6_test_cls/<id>.png) or `cityscapes` (labelIds PNGs for the
benchmark). The run's evaluation protocol applies (output stride, scales, flip, sliding window, CRF)
unless `--eval.*` / `--crf.*` override it; `--split test` reads the run dataset's images without ground
truth (VOC test, Cityscapes test; `--data.root` says where). A corrupt image stops with one line naming it
(exit 2); every output written before it is complete.
"""
from __future__ import annotations

from pathlib import Path

from deeplab_lit.cli import parser as command_parser
from deeplab_lit.cli import run
from deeplab_lit.config import split_overrides


def parse_args(argv):
    from deeplab_lit.prediction import FORMATS

    parser = command_parser("python -m deeplab_lit.predict", __doc__)
    parser.add_argument("--checkpoint", required=True, help="model.pt (or last.ckpt, best-on-val.pt) of a run")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="DIR|FILE|GLOB", help="images: a directory (recursively), a file or a "
                        "quoted glob pattern")
    source.add_argument("--split", help="a split of the run's dataset, e.g. test (VOC test, Cityscapes test) or val")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--format", default="index", choices=FORMATS, help="what to write (default index)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (same-size images "
                        "run together; default 4)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    args, rest = parser.parse_known_args(argv)
    if not args.input and not args.split:
        parser.error("give --input DIR|FILE|GLOB or --split NAME")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args, split_overrides(rest)


def main(argv: list[str]) -> int:
    from deeplab_lit.api import load_checkpoint
    from deeplab_lit.files import check_writable_dir
    from deeplab_lit.prediction import check_format, list_inputs, predict_files, split_inputs

    args, overrides = parse_args(argv)
    out = Path(args.out)
    check_writable_dir(out, "--out")
    inputs = list_inputs(args.input) if args.input else None
    segmenter = load_checkpoint(args.checkpoint, device=args.device, overrides=overrides)
    check_format(segmenter.spec, args.format)
    if inputs is None:
        inputs = split_inputs(segmenter.spec, args.split)
    protocol = segmenter.protocol
    print(f"{segmenter.spec.name}: {segmenter.weights} weights, step {segmenter.step}, on {segmenter.device}; "
          f"output stride {protocol.output_stride}, scales {list(protocol.scales)}, flip {protocol.flip}, "
          f"{protocol.mode}, CRF {'on' if protocol.crf else 'off'}")
    written = predict_files(segmenter, inputs, out, args.format, batch_size=args.batch_size)
    print(f"wrote {len(written)} {args.format} files to {out}")
    if args.format == "voc":
        print(f"upload: tar -czf results.tgz -C {out} results")
    return 0


if __name__ == "__main__":
    run(main)
