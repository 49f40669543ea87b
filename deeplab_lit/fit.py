"""python -m deeplab_lit.fit --experiment NAME [--section.key=value ...]

Trains one experiment (one paper row), validates during training, and at the end evaluates the best
checkpoint with the experiment's evaluation protocols (and the CRF where the row has it), prints a
per-class table and writes `summary.json` next to the checkpoints.

The run directory is `output_dir/NAME/<overrides digest>-seed<seed>` unless `--run-dir` says
otherwise, so the same command (a SLURM requeue, a crashed job started again) finds its
`last.ckpt` and resumes; `--resume PATH` resumes from any checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import time
import warnings
from pathlib import Path

from deeplab_lit.cli import run, split_overrides
from deeplab_lit.config import Config, list_experiments, load_experiment, to_dict, to_yaml
from deeplab_lit.errors import UserError


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m deeplab_lit.fit", description=__doc__.split("\n\n")[1])
    parser.add_argument("--experiment", help="experiment id (see --list)")
    parser.add_argument("--list", action="store_true", help="list every experiment and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--resume", metavar="PATH", help="resume from this checkpoint")
    parser.add_argument("--run-dir", metavar="DIR", help="where checkpoints, logs and summary.json go")
    args, rest = parser.parse_known_args(argv)
    return args, split_overrides(rest)


def default_run_dir(cfg: Config, overrides: list[str]) -> Path:
    """Deterministic per (experiment, overrides, seed): the same command resumes the same run."""
    tag = "default"
    relevant = sorted(o for o in overrides if not o.startswith(("trainer.devices", "trainer.num_nodes", "wandb.")))
    if relevant:
        tag = hashlib.sha1("\n".join(relevant).encode()).hexdigest()[:8]
    return Path(cfg.output_dir) / cfg.name / f"{tag}-seed{cfg.seed}"


def trainer_arguments(cfg: Config) -> dict:
    """The config's `trainer.*` over this project's defaults (accelerator auto, bf16 on capable GPUs)."""
    import torch

    defaults = {"accelerator": "auto", "devices": "auto"}
    if "precision" not in cfg.trainer:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        defaults["precision"] = "bf16-mixed" if bf16 else "32-true"
    return {**defaults, **cfg.trainer}


def protocol_record(cfg: Config, trainer, init_source: str) -> dict:
    """What a dashboard needs to group any ablation by any column."""
    return {
        "train_output_stride": cfg.model.output_stride,
        "eval_output_stride": cfg.eval.output_stride or cfg.model.output_stride,
        "eval_mode": cfg.eval.mode,
        "eval_scales": list(cfg.eval.scales),
        "eval_flip": cfg.eval.flip,
        "crf": {**to_dict(cfg)["crf"]},
        "bn_mode": cfg.model.bn if cfg.model.backbone != "vgg16" else "none (VGG-16)",
        "effective_batch_size": cfg.data.batch_size
        * trainer.world_size
        * int(cfg.trainer.get("accumulate_grad_batches", 1) or 1),
        "init_source": init_source,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
    }


def init_source(cfg: Config) -> str:
    if cfg.model.pretrained == "imagenet":
        return "imagenet (torchvision)"
    if cfg.model.pretrained == "none":
        return "random (no pre-training)"
    return f"file {cfg.model.pretrained}"


def build_loggers(cfg: Config, run_dir: Path, run_config: dict):
    if cfg.wandb.mode == "disabled":
        return []
    from lightning.pytorch.loggers import WandbLogger

    tags = sorted({*cfg.wandb.tags, cfg.model.generation, cfg.model.backbone, cfg.data.name})
    return [
        WandbLogger(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=cfg.wandb.group or cfg.ablation or cfg.name,
            name=f"{cfg.name}-{run_dir.name}",
            tags=tags,
            mode=cfg.wandb.mode,
            save_dir=str(run_dir),
            config=run_config,
            log_model=cfg.wandb.mode == "online",
            job_type="train",
        )
    ]


def build_callbacks(cfg: Config, checkpoint_dir: Path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    from deeplab_lit.training import SaveOnSigterm

    best = ModelCheckpoint(
        dirpath=str(checkpoint_dir),
        filename="best-step{step}",
        monitor="val/mIoU",
        mode="max",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,  # metric names contain '/', which would become directories
    )
    callbacks = [best, SaveOnSigterm(checkpoint_dir)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar(leave=True))
    if cfg.wandb.mode != "disabled":  # the monitor needs a logger; with W&B disabled there is none
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return best, callbacks


def slurm_plugins() -> list:
    """Under SLURM: Lightning's environment detection, and requeue on SIGUSR1 before the time limit."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)]


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    if args.list:
        experiments = list_experiments()
        width = max(map(len, experiments))
        for name, description in experiments.items():
            print(f"{name:<{width}}  {description}")
        return 0
    if not args.experiment:
        raise UserError("--experiment NAME is required; `python -m deeplab_lit.fit --list` lists them")
    cfg = load_experiment(args.experiment, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    return train(cfg, overrides, args.run_dir, args.resume)


def train(
    cfg: Config, overrides: list[str], run_dir: str | None = None, resume: str | None = None, callbacks=()
) -> int:
    import lightning as L
    import torch

    from datamodules import build_datamodule
    from deeplab_lit.evaluate import print_results, run_evaluation, write_json_atomic
    from deeplab_lit.inference import protocols_from_config
    from deeplab_lit.modules import build_module
    from deeplab_lit.training import AtomicCheckpointIO, find_resume_checkpoint

    started = time.time()
    run_path = Path(run_dir) if run_dir else default_run_dir(cfg, overrides)
    checkpoint_dir = run_path / "checkpoints"
    resume_path = find_resume_checkpoint(resume, checkpoint_dir)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data)
    module = build_module(cfg, datamodule.num_classes, datamodule.class_names)

    best, default_callbacks = build_callbacks(cfg, checkpoint_dir)
    arguments = trainer_arguments(cfg)
    trainer = L.Trainer(
        **arguments,
        default_root_dir=str(run_path),
        callbacks=[*default_callbacks, *callbacks],
        logger=False,  # set below, once the world size (for the effective batch size) is known
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
        use_distributed_sampler=False,  # the DataModule shards itself: evaluation must not pad
        sync_batchnorm=cfg.model.bn == "sync",
        enable_model_summary=False,
    )
    run_config = {
        **to_dict(cfg),
        "protocol": protocol_record(cfg, trainer, init_source(cfg)),
        "overrides": list(overrides),
        "run_dir": str(run_path),
    }
    loggers = build_loggers(cfg, run_path, run_config)
    if loggers:
        trainer.loggers = loggers
    if trainer.is_global_zero:
        run_path.mkdir(parents=True, exist_ok=True)
        (run_path / "config.yaml").write_text(to_yaml(cfg))
        if resume_path:
            print(f"resuming from {resume_path}")
        if loggers:  # lets `evaluate --wandb.resume=true` log into this run
            (run_path / "wandb_id").write_text(loggers[0].experiment.id)

    # Lightning looks for a stateful DataLoader; ours resumes mid-epoch through the DataModule's state
    # (the batches already trained are skipped, tests/test_fit.py checks identical weights).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
    # The final state, whatever the validation interval: what a later resume or evaluation starts from.
    trainer.save_checkpoint(str(checkpoint_dir / "last.ckpt"))

    # Final evaluation: the best checkpoint under every protocol of the experiment.
    best_path = best.best_model_path or best.last_model_path
    if best_path:
        state = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    results = run_evaluation(trainer, module, datamodule, protocols_from_config(cfg))
    if trainer.is_global_zero:
        summary = {
            "experiment": cfg.name,
            "description": cfg.description,
            "ablation": cfg.ablation,
            "seed": cfg.seed,
            "config": to_dict(cfg),
            "overrides": list(overrides),
            "protocol": run_config["protocol"],
            "protocols": {key: value["protocol"] for key, value in results.items()},
            "metrics": {f"val/{key}": value["mIoU"] for key, value in results.items()},
            "pixel_acc": {f"val/{key}": value["pixel_acc"] for key, value in results.items()},
            "per_class_iou": results["mIoU"]["per_class_iou"],
            "paper": to_dict(cfg)["paper"],
            "checkpoint": best_path,
            "steps": trainer.global_step,
            "wall_time_s": round(time.time() - started, 1),
            "device": device_description(trainer),
        }
        summary_path = checkpoint_dir / "summary.json"
        write_json_atomic(summary_path, summary)
        print_results(results, module.class_names, title=f"{cfg.name}: best checkpoint {Path(best_path).name}")
        print(f"summary: {summary_path}")
        for logger in trainer.loggers:
            logger.experiment.summary.update({**summary["metrics"], "summary_json": str(summary_path)})
    for logger in trainer.loggers:
        logger.experiment.finish()  # the next run in this process (a sweep, a test) starts its own
    return 0


def device_description(trainer) -> str:
    import platform

    import torch

    if trainer.strategy.root_device.type == "cuda":
        return f"{trainer.world_size} x {torch.cuda.get_device_name(trainer.strategy.root_device)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores) x {trainer.world_size}"


if __name__ == "__main__":
    run(main)
