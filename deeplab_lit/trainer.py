"""The Lightning Trainer, loggers and callbacks of a run, built from its `RunSpec` (fit and evaluate).

The Trainer is built before any data or network work, so that an argument Lightning refuses (devices 0,
an accelerator this machine lacks, ...) ends the command in one line at once.
"""
from __future__ import annotations

import os
import platform
import signal
from pathlib import Path
from typing import Sequence

from deeplab_lit.config import RunSpec
from deeplab_lit.config.compose import one_line
from deeplab_lit.errors import UserError


def build_trainer(spec: RunSpec, *, root_dir: Path, callbacks: Sequence = (), plugins: Sequence = (),
                  evaluation: bool = False, progress_bar: bool = True):
    """A Trainer for training (`evaluation=False`) or for evaluating a checkpoint (one device unless
    `trainer.devices` says otherwise; no checkpointing)."""
    import lightning as L

    if spec.config.model.bn == "sync":
        from deeplab_lit.sync_batchnorm import SyncBatchNormKeepingActivations

        plugins = [*plugins, SyncBatchNormKeepingActivations()]
    arguments = spec.trainer_arguments()
    if evaluation and "devices" not in spec.config.trainer:
        arguments["devices"] = 1
    show_bar = progress_bar and arguments.get("enable_progress_bar", True)
    if show_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks = [*callbacks, RichProgressBar(leave=True)]
    try:
        return L.Trainer(
            **arguments,
            default_root_dir=str(root_dir),
            callbacks=list(callbacks),
            logger=False,  # set by the caller once the world size (for the run's columns) is known
            plugins=list(plugins),
            use_distributed_sampler=False,  # the DataModule shards itself: evaluation must not pad
            sync_batchnorm=spec.config.model.bn == "sync",
            enable_model_summary=False,
            **({"enable_checkpointing": False} if evaluation else {}),
        )
    except Exception as error:  # MisconfigurationException, ValueError, ...: Lightning's own words
        raise UserError(f"trainer arguments {dict(spec.config.trainer)}: {one_line(str(error))}") from None


def slurm_plugins() -> list:
    """Under SLURM: Lightning's environment detection, and requeue on SIGUSR1 before the time limit."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)]


def run_columns(spec: RunSpec, trainer) -> dict:
    """What a dashboard needs to group any ablation by any column."""
    config = spec.config
    main = spec.protocols[0]
    return {
        "train_output_stride": config.model.output_stride,
        "eval_output_stride": main.output_stride,
        "eval_mode": main.mode,
        "eval_scales": list(main.scales),
        "eval_flip": main.flip,
        "crf": {"enabled": config.crf.enabled, "backend": config.crf.backend,
                **{k: getattr(config.crf, k) for k in ("iterations", "bi_w", "bi_xy_std", "bi_rgb_std", "pos_w",
                                                         "pos_xy_std")}},
        "bn_mode": config.model.bn if config.model.backbone != "vgg16" else "none (VGG-16)",
        "effective_batch_size": config.data.batch_size * trainer.world_size
        * int(config.trainer.get("accumulate_grad_batches", 1) or 1),
        "init_source": init_source(config.model),
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
    }


def init_source(model_cfg) -> str:
    pretrained = model_cfg.pretrained
    if pretrained == "imagenet":
        from deeplab_lit.models import imagenet_source

        return f"imagenet ({imagenet_source(model_cfg.backbone)})"
    if pretrained == "none":
        return "random (no pre-training)"
    return f"file {pretrained}"


def wandb_logger(spec: RunSpec, run_dir: Path, run_config: dict):
    from lightning.pytorch.loggers import WandbLogger

    config = spec.config
    tags = sorted({*config.wandb.tags, config.model.generation, config.model.backbone, config.data.name})
    return WandbLogger(
        project=config.wandb.project,
        entity=config.wandb.entity,
        group=config.wandb.group or config.ablation or config.name,
        name=f"{config.name}-{run_dir.name}",
        tags=tags,
        mode=config.wandb.mode,
        save_dir=str(run_dir),
        config=run_config,
        log_model=config.wandb.mode == "online",
        job_type="train",
    )


def resumed_wandb_logger(spec: RunSpec, run_dir: Path):
    """The W&B run of a training run directory, resumed (evaluate --wandb.resume=true)."""
    from lightning.pytorch.loggers import WandbLogger

    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        raise UserError(f"--wandb.resume: {id_file} not found; the run was trained with wandb.mode=disabled")
    mode = spec.config.wandb.mode if spec.config.wandb.mode != "disabled" else "offline"
    return WandbLogger(id=id_file.read_text().strip(), resume="allow", project=spec.config.wandb.project,
                       entity=spec.config.wandb.entity, save_dir=str(run_dir), mode=mode)


def device_description(trainer) -> str:
    import torch

    if trainer.strategy.root_device.type == "cuda":
        return f"{trainer.world_size} x {torch.cuda.get_device_name(trainer.strategy.root_device)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores) x {trainer.world_size}"

