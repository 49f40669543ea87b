"""Where runs come from: local summary records (`summary.json`, fully offline) and W&B runs, read into
one record type.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from deeplab_lit.errors import UserError
from deeplab_lit.records import SummaryRecord

@dataclass
class RunRecord:
    experiment: str
    seed: int
    config: dict  # the resolved experiment, nested
    metrics: dict[str, float]  # "val/mIoU": 0.7123 (fractions)
    protocol: dict = field(default_factory=dict)  # fit's protocol record (train/eval stride, batch, init)
    protocols: dict = field(default_factory=dict)  # metric key without "val/" -> evaluation protocol
    overrides: list[str] = field(default_factory=list)
    steps: Optional[int] = None
    source: str = ""  # summary.json path or W&B run URL
    created: str = ""  # ISO time, for "newest"


def from_summary(record: SummaryRecord, source: str, created: str) -> RunRecord:
    return RunRecord(
        experiment=record.experiment, seed=record.seed, config=record.config, metrics=record.metrics,
        protocol=record.protocol, protocols={key: result.protocol for key, result in record.results.items()},
        overrides=list(record.overrides), steps=record.steps, source=source, created=created)


def load_local(root: Path) -> list[RunRecord]:
    """Every `summary.json` under `root` (fit writes `<run dir>/checkpoints/summary.json`)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--runs {root}: no such directory; fit writes runs to output_dir (default runs/)")
    records = []
    for path in sorted(root.rglob("summary.json")):
        created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat()
        record = SummaryRecord.read(path)
        if record.weights == "best-on-val":  # selected on the evaluation split: never compared with the paper
            continue
        records.append(from_summary(record, str(path), created))
    return records


def load_wandb(path: str, sweep: Optional[str] = None) -> tuple[list[RunRecord], Counter]:
    """Finished runs of a W&B project (or of one sweep in it); also counts the runs skipped by state."""
    import wandb

    if path.count("/") != 1:
        raise UserError(f"--wandb {path}: expected ENTITY/PROJECT")
    skipped: Counter = Counter()
    records = []
    try:
        api = wandb.Api()
        runs = api.sweep(f"{path}/{sweep}").runs if sweep else api.runs(path)
        for wandb_run in runs:
            if wandb_run.state != "finished":
                skipped[wandb_run.state] += 1
                continue
            config = dict(wandb_run.config)
            summary = dict(wandb_run.summary_metrics)
            name = config.get("name") or config.get("experiment")
            if not name or "model" not in config:
                skipped["not a deeplab_lit.fit run"] += 1
                continue
            records.append(RunRecord(
                experiment=name,
                seed=int(config.get("seed", 0)),
                config=config,
                metrics={k: float(v) for k, v in summary.items()
                         if k.startswith("val/mIoU") and isinstance(v, (int, float))},
                protocol=config.get("protocol", {}),
                overrides=list(config.get("overrides", [])),
                steps=summary.get("trainer/global_step"),
                source=wandb_run.url,
                created=str(wandb_run.created_at),
            ))
    except UserError:
        raise
    except Exception as error:  # network, authentication, unknown project: many types, one message
        text = " ".join(str(error).split())[:200]
        raise UserError(f"--wandb {path}{' --sweep ' + sweep if sweep else ''}: {type(error).__name__}: {text}; "
                        "check `wandb login` and the path, or build the report from --runs DIR") from None
    return records, skipped


