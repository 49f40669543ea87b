"""Evaluating a module under several protocols in one pass, and printing the per-class table.

Used by `fit` (its final evaluation) and `evaluate`. Metrics come from pixel counts per protocol over
the whole split, gathered over DDP ranks; the DataModule's evaluation sampler gives each image to
exactly one rank, so the result does not depend on the number of processes. Each result carries its
per-image counts and the first `eval.qualitative_images` predictions, which `SummaryRecord.write`
puts beside the JSON (`per_image.npz`, `predictions/`).
"""
from __future__ import annotations

from typing import Optional, Sequence

from deeplab_lit.protocols import MetricKey, Protocol
from deeplab_lit.records import MetricResult



def main_confusion(module):
    """The main protocol's confusion matrix (pixels, rows = ground truth) of the module's last evaluation."""
    result = getattr(module, "last_results", {}).get("mIoU")
    return None if result is None else result["per_image"].confusion

def run_evaluation(trainer, module, datamodule, protocols: Sequence[Protocol], dataloaders=None, *,
                   checkpoint: str = "", step: Optional[int] = None) -> dict[str, MetricResult]:
    """Validate `module` under every protocol; results keyed by metric key ("mIoU", "mIoU_os8", ...)."""
    previous = module.protocols
    module.set_protocols(protocols)
    try:
        if dataloaders is not None:
            trainer.validate(module, dataloaders=dataloaders, verbose=False)
        else:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        raw = dict(module.last_results)
    finally:
        module.set_protocols(previous)
    results = {}
    for protocol in protocols:
        for key in protocol.metric_keys():
            numbers = raw[key.text]
            results[key.text] = MetricResult(
                miou=numbers["mIoU"], pixel_acc=numbers["pixel_acc"], per_class_iou=numbers["per_class_iou"],
                protocol=protocol.describe(crf=key.crf), checkpoint=checkpoint, step=step,
                per_image=numbers.get("per_image"), predictions=numbers.get("predictions") or {})
    return results


def print_results(results: dict[str, MetricResult], class_names: Sequence[str], title: str = "") -> None:
    """Per-class IoU (%) for every protocol side by side (one column per metric key), then mIoU and
    pixel accuracy."""
    from rich.console import Console
    from rich.table import Table

    keys = list(results)
    console = Console(width=max(80, 22 + 14 * len(keys)))
    if title:
        console.print(title, soft_wrap=True, highlight=False)
    table = Table(title="IoU per class (%)")
    table.add_column("class")
    for key in keys:
        table.add_column(_column_title(key), justify="right")
    for name in class_names:
        table.add_row(name, *[_percent(results[key].per_class_iou.get(name)) for key in keys])
    table.add_section()
    table.add_row("mIoU", *[_percent(results[key].miou) for key in keys], style="bold")
    table.add_row("pixel acc", *[_percent(results[key].pixel_acc) for key in keys])
    console.print(table)


def _column_title(key: str) -> str:
    """The protocol a column belongs to: "main", "os8", "crf", "os8 + crf"."""
    metric_key = MetricKey.parse(key)
    parts = [metric_key.protocol or "main", *(["CRF"] if metric_key.crf else [])]
    return " + ".join(parts)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def evaluate_run(loaded, *, split: str = "val", resume_wandb: bool = False):
    """Evaluate a checkpoint read by `checkpoints.load_run` under its spec's protocols on `split`.

    Returns the summary record on global rank 0 (None on the other ranks) after printing the table."""
    from datamodules import build_datamodule
    from deeplab_lit.modules import build_module
    from deeplab_lit.records import SummaryRecord
    from deeplab_lit.trainer import (
        build_trainer, device_description, finish_loggers, log_final_results, resumed_wandb_logger, run_columns)

    spec = loaded.spec
    run_dir = loaded.path.resolve().parent.parent  # <run dir>/checkpoints/<file>
    trainer = build_trainer(spec, root_dir=loaded.path.parent, evaluation=True)
    if resume_wandb:
        trainer.loggers = [resumed_wandb_logger(spec, run_dir)]
    datamodule = build_datamodule(spec.config.data)
    datamodule.setup("validate")
    dataloaders = datamodule.eval_dataloader(split) if split != "val" else None
    module = build_module(spec, network=loaded.network())
    results = run_evaluation(trainer, module, datamodule, spec.protocols, dataloaders,
                             checkpoint=str(loaded.path), step=loaded.step)
    record = None
    if trainer.is_global_zero:
        config = spec.config
        record = SummaryRecord(
            kind="evaluate", experiment=config.name, split=split, results=results, config=spec.to_dict(),
            class_names=list(spec.dataset.class_names), seed=config.seed, description=config.description,
            ablation=config.ablation, overrides=list(spec.overrides), protocol=run_columns(spec, trainer),
            paper=spec.to_dict()["paper"], checkpoint=str(loaded.path), steps=loaded.step,
            device=device_description(trainer), weights=loaded.weights)
        label = {"final": "final weights", "best-on-val": "best-on-val weights (selected on val, not comparable with "
                 "the paper)", "checkpoint": "checkpoint"}.get(loaded.weights, loaded.weights)
        print_results(results, spec.dataset.class_names,
                      title=f"{spec.name} on {split}: {label}, step {loaded.step} ({loaded.path})")
        log_final_results(trainer.loggers, record, main_confusion(module))
    finish_loggers(trainer)
    return record
