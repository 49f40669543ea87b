"""python -m deeplab_lit.summary --experiment NAME | --config FILE [--json] [--section.key=value ...]

Parameters (total and trainable), GMACs (multiply-adds counted by torch.utils.flop_counter, batch 1,
at the experiment's crop and at 513x513), train and eval output stride, the atrous rates the built
network actually uses (read from its modules), and the field of view of the head. Used by the README
model table and by the report's GPU-hour estimates.
"""
from __future__ import annotations

import json

from deeplab_lit.cli import parser as command_parser
from deeplab_lit.cli import run
from deeplab_lit.config import resolve_experiment, resolve_file, split_overrides
from deeplab_lit.errors import UserError


def main(argv: list[str]) -> int:
    from deeplab_lit.model_summary import summarize

    parser = command_parser("python -m deeplab_lit.summary", __doc__)
    parser.add_argument("--experiment")
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--sizes", type=int, nargs="+", help="input sizes for GMACs (default: crop and 513)")
    args, rest = parser.parse_known_args(argv)
    if not (args.experiment or args.config):
        raise UserError("give --experiment NAME or --config FILE")
    overrides = split_overrides(rest)
    spec = resolve_file(args.config, overrides) if args.config else resolve_experiment(args.experiment, overrides)
    info = summarize(spec, args.sizes)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['experiment']}: {info['generation']} {info['backbone']} head={info['head']}")
    print(f"  parameters      {info['parameters'] / 1e6:.2f} M ({info['trainable_parameters'] / 1e6:.2f} M trainable)")
    for size, gmacs in info["gmacs"].items():
        print(f"  GMACs @ {size:<9}{gmacs:.2f}")
    print(f"  output stride   train {info['train_output_stride']}, eval {info['eval_output_stride']}")
    print(f"  atrous rates    {info['atrous_rates']}")
    print(f"  field of view   {info['field_of_view']}")
    return 0


if __name__ == "__main__":
    run(main)
