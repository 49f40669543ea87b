"""python -m deeplab_lit.evaluate --checkpoint PATH [--split val] [--json FILE] [--section.key=value ...]

Evaluates a checkpoint written by `fit` (its `model.pt`, the final weights; `last.ckpt`; or the labelled
`best-on-val.pt` of keep_best_on_val) under any protocol: `eval.output_stride`, `eval.scales`,
`eval.flip`, `eval.mode` (whole|slide), `crf.enabled` and the CRF parameters (or `--crf-params FILE`,
the `crf_best.yaml` of the CRF search), on the val split or `--split`. Prints the per-class IoU table,
mIoU and pixel accuracy, writes the summary record (`--json`), and with `--wandb.resume=true` logs
into the checkpoint's own W&B run so that one training run carries all its protocols side by side.
Keys that would change the trained network are refused.

Metrics come from one confusion matrix over the whole split, summed over DDP ranks; each image is
evaluated exactly once (the DataModule's evaluation sampler never pads).
"""
from __future__ import annotations

from pathlib import Path

from deeplab_lit.cli import parser as command_parser
from deeplab_lit.cli import run
from deeplab_lit.config import split_overrides
from deeplab_lit.errors import UserError


def parse_args(argv):
    parser = command_parser("python -m deeplab_lit.evaluate", __doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="val", help="dataset split (default val)")
    parser.add_argument("--json", metavar="FILE", help="write the summary record (protocols, metrics) here")
    parser.add_argument("--experiment", help="refuse a checkpoint that was not trained for this experiment")
    parser.add_argument("--crf-params", metavar="FILE", help="CRF parameters: a YAML file with a crf: mapping "
                        "(the crf_best.yaml of python -m deeplab_lit.crf_search)")
    parser.add_argument("--wandb.resume", dest="wandb_resume", choices=["true", "false"], default="false",
                        help="log into the checkpoint's own W&B run")
    args, rest = parser.parse_known_args(argv)
    return args, split_overrides(rest)


def read_crf_params(path: str) -> dict:
    """The `crf:` mapping of a YAML file, as config values."""
    from deeplab_lit.config.compose import read_yaml

    data = read_yaml(Path(path), "--crf-params")
    if not isinstance(data.get("crf"), dict):
        raise UserError(f"--crf-params {path}: expected a 'crf:' mapping of CRF parameters (bi_w, bi_xy_std, ...)")
    return {"crf": data["crf"]}


def main(argv: list[str]) -> int:
    from deeplab_lit.checkpoints import load_run
    from deeplab_lit.evaluation import evaluate_run
    from deeplab_lit.files import check_writable

    args, overrides = parse_args(argv)
    updates = read_crf_params(args.crf_params) if args.crf_params else None
    if args.json:
        check_writable(args.json, "--json")
    loaded = load_run(args.checkpoint, overrides, updates=updates)
    if args.experiment and args.experiment != loaded.spec.name:
        raise UserError(f"--checkpoint {args.checkpoint} was trained for experiment '{loaded.spec.name}', "
                        f"not '{args.experiment}'")
    record = evaluate_run(loaded, split=args.split, resume_wandb=args.wandb_resume == "true")
    if record is not None and args.json:
        record.write(args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run(main)
