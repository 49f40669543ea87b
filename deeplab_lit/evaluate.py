"""python -m deeplab_lit.evaluate --checkpoint PATH [--split val] [--json FILE] [--section.key=value ...]

Evaluates a checkpoint written by `fit` under any protocol: `eval.output_stride`, `eval.scales`,
`eval.flip`, `eval.mode` (whole|slide), `crf.enabled` and the CRF parameters, on the val split or
`--split`. Prints the per-class IoU table, mIoU and pixel accuracy, writes JSON with the protocol and
the metrics, and with `--wandb.resume=true` logs into the checkpoint's own W&B run so that one
training run carries all its evaluation protocols side by side.

Metrics come from one confusion matrix over the whole split, summed over DDP ranks; each image is
evaluated exactly once (the DataModule's evaluation sampler never pads).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from deeplab_lit.cli import run, split_overrides
from deeplab_lit.errors import UserError

# Overrides that change what the weights mean are refused: evaluate the checkpoint as it was trained.
HARDWARE_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "precision")
ALLOWED_SECTIONS = ("eval.", "crf.", "data.root", "data.num_workers", "data.eval_batch_size", "trainer.", "wandb.")


def run_evaluation(trainer, module, datamodule, protocols, dataloaders=None) -> dict:
    """Validate `module` under every protocol in one pass; results keyed like the metric names.

    Returns {"mIoU": {...}, "mIoU_os8": {...}, "mIoU_crf": {...}}, each with mIoU, pixel_acc,
    per_class_iou and the protocol that produced it.
    """
    previous = module.protocols
    module.set_protocols(protocols)
    try:
        if dataloaders is not None:
            trainer.validate(module, dataloaders=dataloaders, verbose=False)
        else:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        results = dict(module.last_results)
    finally:
        module.set_protocols(previous)
    for protocol in protocols:
        for crf in [False, True] if protocol.crf else [False]:
            key = module.metric_key(protocol, crf)
            results[key]["protocol"] = {**protocol.describe(), "crf": crf}
    return results


def print_results(results: dict, class_names: list[str], title: str = "") -> None:
    """Per-class IoU (%) for every protocol side by side, then mIoU and pixel accuracy."""
    from rich.console import Console
    from rich.table import Table

    keys = list(results)
    console = Console(width=max(80, 22 + 14 * len(keys)))
    if title:
        console.print(title, soft_wrap=True)
    table = Table()
    table.add_column("class")
    for key in keys:
        table.add_column(key, justify="right")
    for name in class_names:
        cells = [results[key]["per_class_iou"].get(name, float("nan")) for key in keys]
        table.add_row(name, *[_percent(value) for value in cells])
    table.add_section()
    table.add_row("mIoU", *[_percent(results[key]["mIoU"]) for key in keys], style="bold")
    table.add_row("pixel acc", *[_percent(results[key]["pixel_acc"]) for key in keys])
    console.print(table)


def _percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.2f}"


def write_json_atomic(path, data) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        json.dump(data, stream, indent=2, default=str)
    os.replace(temporary, path)


def read_checkpoint(path: str) -> dict:
    import torch

    if not Path(path).is_file():
        raise UserError(f"--checkpoint {path}: no such file; fit writes checkpoints to runs/<experiment>/.../checkpoints/")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or foreign file
        raise UserError(f"--checkpoint {path}: cannot be read as a checkpoint ({type(error).__name__})") from None
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "config" not in hparams or "state_dict" not in checkpoint:
        raise UserError(f"--checkpoint {path}: not a checkpoint written by deeplab_lit.fit (no stored config)")
    return checkpoint


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m deeplab_lit.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="val", help="dataset split (default val)")
    parser.add_argument("--json", metavar="FILE", help="write protocol and metrics here")
    parser.add_argument("--experiment", help="refuse a checkpoint that was not trained for this experiment")
    parser.add_argument("--crf-params", metavar="FILE", help="CRF parameters (crf_best.yaml of crf.search)")
    args, rest = parser.parse_known_args(argv)
    return args, split_overrides(rest)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    if args.crf_params:
        overrides = crf_param_overrides(args.crf_params) + overrides
    checkpoint = read_checkpoint(args.checkpoint)
    hparams = checkpoint["hyper_parameters"]
    stored = hparams["config"]
    if args.experiment and args.experiment != stored.get("name"):
        raise UserError(
            f"--checkpoint {args.checkpoint} was trained for experiment '{stored.get('name')}', "
            f"not '{args.experiment}'"
        )
    resume_wandb = False
    kept = []
    for override in overrides:
        if override.split("=", 1)[0] == "wandb.resume":
            from deeplab_lit.config import parse_override

            resume_wandb = bool(parse_override(override)[1])
        elif not override.startswith(ALLOWED_SECTIONS):
            raise UserError(
                f"override {override.split('=')[0]} changes the trained network; evaluate accepts "
                "eval.*, crf.*, data.root, data.num_workers, data.eval_batch_size, trainer.* and wandb.*"
            )
        else:
            kept.append(override)
    return evaluate(args.checkpoint, checkpoint, kept, args.split, args.json, resume_wandb)


def crf_param_overrides(path: str) -> list[str]:
    """`crf: {bi_w: .., ...}` from a YAML file (crf.search's crf_best.yaml) as overrides."""
    import yaml

    if not Path(path).is_file():
        raise UserError(f"--crf-params {path}: no such file; `python -m deeplab_lit.crf.search` writes crf_best.yaml")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data.get("crf"), dict):
        raise UserError(f"--crf-params {path}: expected a 'crf:' mapping of CRF parameters")
    return [f"crf.{key}={value}" for key, value in data["crf"].items()]


def evaluate(path, checkpoint, overrides, split, json_path, resume_wandb) -> int:
    import copy

    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    from datamodules import build_datamodule
    from deeplab_lit.config import _set_dotted, config_from_dict, parse_override, to_dict
    from deeplab_lit.fit import trainer_arguments
    from deeplab_lit.inference import protocols_from_config
    from deeplab_lit.modules import MODULES

    raw = copy.deepcopy(checkpoint["hyper_parameters"]["config"])
    # Of the training run's Trainer arguments only the hardware carries over: its limits (e.g.
    # limit_val_batches, which counts per rank) must not shrink the evaluated split.
    raw["trainer"] = {k: v for k, v in raw.get("trainer", {}).items() if k in HARDWARE_KEYS}
    for override in overrides:
        _set_dotted(raw, *parse_override(override))
    cfg = config_from_dict(raw)
    hparams = checkpoint["hyper_parameters"]
    module = MODULES[cfg.model.generation](to_dict(cfg), hparams["num_classes"], hparams["class_names"])
    module.load_state_dict(checkpoint["state_dict"])

    datamodule = build_datamodule(cfg.data)
    if datamodule.num_classes != hparams["num_classes"]:
        raise UserError(
            f"--checkpoint {path} predicts {hparams['num_classes']} classes but data '{cfg.data.name}' has "
            f"{datamodule.num_classes}"
        )
    arguments = trainer_arguments(cfg)
    if "devices" not in cfg.trainer:
        arguments["devices"] = 1
    loggers = _resumed_wandb_logger(cfg, path) if resume_wandb else False
    trainer = L.Trainer(
        **{**arguments, "logger": loggers},
        callbacks=[RichProgressBar(leave=True)],
        use_distributed_sampler=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(Path(path).parent),
    )
    dataloaders = None
    if split != "val":
        datamodule.setup("validate")
        dataloaders = datamodule.eval_dataloader(split)
    results = run_evaluation(trainer, module, datamodule, protocols_from_config(cfg), dataloaders)
    if not trainer.is_global_zero:
        return 0
    print_results(results, module.class_names, title=f"{cfg.name} on {split}: {path}")
    report = {
        "checkpoint": str(path),
        "experiment": cfg.name,
        "split": split,
        "overrides": list(overrides),
        "metrics": {f"{split}/{key}": value["mIoU"] for key, value in results.items()},
        "results": results,
        "crf_params": to_dict(cfg)["crf"],
    }
    if json_path:
        write_json_atomic(json_path, report)
        print(f"wrote {json_path}")
    return 0


def _resumed_wandb_logger(cfg, checkpoint_path):
    from lightning.pytorch.loggers import WandbLogger

    run_dir = Path(checkpoint_path).resolve().parent.parent
    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        raise UserError(f"--wandb.resume: {id_file} not found; the run was trained with wandb.mode=disabled")
    mode = cfg.wandb.mode if cfg.wandb.mode != "disabled" else "offline"
    return [
        WandbLogger(
            id=id_file.read_text().strip(),
            resume="allow",
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            save_dir=str(run_dir),
            mode=mode,
        )
    ]


if __name__ == "__main__":
    run(main)
