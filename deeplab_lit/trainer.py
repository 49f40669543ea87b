"""The Lightning Trainer, loggers and callbacks of a run, built from its `RunSpec` (fit and evaluate).

The Trainer is built before any data or network work, so that an argument Lightning refuses (devices 0,
an accelerator this machine lacks, ...) ends the command in one line at once.

- The progress bar (`StepProgressBar`) counts optimizer steps, `N/max_steps`, across epochs, with the
  training loss and the last validation's mIoU beside it.
- Every run logs to `<run dir>/metrics.csv` (`csv_metrics_logger`), W&B or not: one row per logging call,
  columns `step`, `epoch`, `train/loss`, `lr-SGD` (+ `lr-SGD/<group>` where a parameter group's rate
  differs), `val/mIoU`, `val/pixel_acc`, `val/iou/<class>`, and the final evaluation's `val/mIoU_<protocol>`.
- W&B runs are created here with only the arguments we mean (no `anonymous`), quietly; at the end they
  get the per-class IoU of every protocol as a table and the main protocol's confusion matrix.
"""
from __future__ import annotations

import csv
import functools
import io
import os
import platform
import signal
import time
from pathlib import Path
from typing import Optional, Sequence

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
        callbacks = [*callbacks, step_progress_bar()]
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
            enable_checkpointing=False,  # training.py writes last.ckpt and the model files itself
        )
    except Exception as error:  # MisconfigurationException, ValueError, ...: Lightning's own words
        raise UserError(f"trainer arguments {dict(spec.config.trainer)}: {one_line(str(error))}") from None


def step_progress_bar():
    """Lightning's rich bar, training counted in optimizer steps (see StepProgressBar)."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        """Training as one bar of optimizer steps, `N/max_steps`, across epochs (Lightning's own counts the
        batches of an epoch and titles it 'Epoch 0/-2' when only max_steps is set); the training loss and
        the last validation's mIoU beside it."""

        def __init__(self):
            super().__init__(leave=True)

        @property
        def total_train_batches(self):
            steps = self.trainer.max_steps
            return steps if steps and steps > 0 else super().total_train_batches

        def _get_train_description(self, current_epoch: int) -> str:
            return f"{'train step':{len(self.validation_description)}}"

        def _initialize_train_progress_bar_id(self) -> None:
            super()._initialize_train_progress_bar_id()
            self.progress.update(self.train_progress_bar_id, completed=self.trainer.global_step)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self.is_disabled:
                return
            if self.progress is None or getattr(self, "_progress_stopped", False):
                self._init_progress(trainer)
            if self.progress is not None and self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            self.refresh()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not self.is_disabled and self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            self._update(self.train_progress_bar_id, trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()

        def get_metrics(self, trainer, pl_module) -> dict:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            miou = trainer.callback_metrics.get("val/mIoU")
            if miou is not None:
                items["val mIoU"] = f"{100 * float(miou):.2f}%"
            return items

    return StepProgressBar()


def csv_metrics_logger(run_dir: Path, resume_step: Optional[int] = None):
    """The run's `metrics.csv` logger (see CSVMetricsLogger below)."""
    return _csv_logger_class()(run_dir, resume_step=resume_step)


@functools.lru_cache(maxsize=None)
def _csv_logger_class():
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.utilities import rank_zero_only

    from deeplab_lit.files import write_text_atomic

    class CSVMetricsLogger(Logger):
        """`<run dir>/metrics.csv`: every logged scalar, one row per logging call, `step` first, then the
        metric names in sorted order; rewritten whole and atomically (at most every `flush_seconds`, and at
        the end), so a reader never sees half a file. A resumed run keeps the rows up to its checkpoint's
        step and continues after them. Lightning's CSVLogger would delete the file of a resumed run."""

        FILE = "metrics.csv"

        def __init__(self, run_dir: Path, resume_step: Optional[int] = None, flush_seconds: float = 10.0):
            super().__init__()
            self.path = Path(run_dir) / self.FILE
            self.flush_seconds = flush_seconds
            self.rows: list[dict] = self._kept_rows(resume_step) if resume_step is not None else []
            self._written = 0.0

        def _kept_rows(self, resume_step: int) -> list[dict]:
            try:
                rows = list(csv.DictReader(io.StringIO(self.path.read_text())))
            except (OSError, UnicodeDecodeError, csv.Error):
                return []

            def step(row) -> float:
                try:
                    return float(row.get("step") or 0)
                except ValueError:
                    return 0

            return [{k: v for k, v in row.items() if v not in ("", None)} for row in rows if step(row) <= resume_step]

        @property
        def name(self) -> str:
            return "csv"

        @property
        def version(self) -> str:
            return ""

        @property
        def save_dir(self) -> str:
            return str(self.path.parent)

        @rank_zero_only
        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass  # the resolved config is config.yaml beside it

        @rank_zero_only
        def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
            row = {"step": step if step is not None else len(self.rows)}
            row.update({k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()})
            self.rows.append(row)

        @rank_zero_only
        def save(self) -> None:
            if time.monotonic() - self._written >= self.flush_seconds:
                self.write()

        @rank_zero_only
        def finalize(self, status: str) -> None:
            self.write()

        def write(self) -> None:
            if not self.rows or not self.path.parent.is_dir():  # never re-create a removed, unstarted run
                return
            keys = sorted({k for row in self.rows for k in row} - {"step"})
            stream = io.StringIO()
            writer = csv.DictWriter(stream, fieldnames=["step", *keys], lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            write_text_atomic(self.path, stream.getvalue())
            self._written = time.monotonic()

    return CSVMetricsLogger


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


def _wandb_run(**arguments):
    """`wandb.init` with exactly our arguments, on global rank 0 only (None elsewhere). Lightning's
    WandbLogger would add `anonymous=None`, which wandb 0.31 answers with a deprecation warning; its
    start-up and summary banners are left out, the commands print where the run is."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return None
    import wandb

    # Offline: silent (the header only says "offline"; fit prints where the run is); online: quiet keeps the URL.
    offline = arguments.get("mode") == "offline"
    run = wandb.init(settings=wandb.Settings(silent=True) if offline else wandb.Settings(quiet=True), **arguments)
    # what WandbLogger does for the runs it creates: every metric against the trainer's step
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return run


def wandb_logger(spec: RunSpec, run_dir: Path, run_config: dict):
    from lightning.pytorch.loggers import WandbLogger

    config = spec.config
    tags = sorted({*config.wandb.tags, config.model.generation, config.model.backbone, config.data.name})
    run = _wandb_run(project=config.wandb.project, entity=config.wandb.entity,
                     group=config.wandb.group or config.ablation or config.name, name=f"{config.name}-{run_dir.name}",
                     tags=tags, mode=config.wandb.mode, dir=str(run_dir), config=run_config, job_type="train",
                     resume="allow", id=os.environ.get("WANDB_RUN_ID") or None)
    return WandbLogger(experiment=run, project=config.wandb.project, save_dir=str(run_dir))


def resumed_wandb_logger(spec: RunSpec, run_dir: Path):
    """The W&B run of a training run directory, resumed (evaluate --wandb.resume=true)."""
    from lightning.pytorch.loggers import WandbLogger

    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        raise UserError(f"--wandb.resume: {id_file} not found; the run was trained with wandb.mode=disabled")
    mode = spec.config.wandb.mode if spec.config.wandb.mode != "disabled" else "offline"
    run = _wandb_run(id=id_file.read_text().strip(), resume="allow", project=spec.config.wandb.project,
                     entity=spec.config.wandb.entity, dir=str(run_dir), mode=mode)
    return WandbLogger(experiment=run, project=spec.config.wandb.project, save_dir=str(run_dir))


def log_final_results(loggers, record, confusion=None, summary_path: Optional[Path] = None,
                      model_path: Optional[Path] = None) -> None:
    """At the end of a run (or an evaluation logged into it): the metrics into the W&B summary, the per-class
    IoU of every protocol as a `wandb.Table`, the main protocol's confusion matrix (pixels, rows = ground
    truth) as W&B's confusion-matrix chart; online, the final model file as a `model` artifact (alias
    `final`); offline, where the run lives."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is None:
            continue
        import wandb

        run = logger.experiment
        keys = list(record.results)
        run.summary.update({**record.metrics, "checkpoint": record.checkpoint, "step": record.steps,
                            **({"summary_json": str(summary_path)} if summary_path else {})})
        rows = [[name, *[_finite(record.results[k].per_class_iou.get(name)) for k in keys]]
                for name in record.class_names]
        logged = {"final/iou_per_class": wandb.Table(columns=["class", *[f"IoU {k}" for k in keys]], data=rows)}
        if confusion is not None:
            names, counts = record.class_names, confusion.tolist()
            table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"],
                                data=[[names[i], names[j], int(counts[i][j])] for i in range(len(names))
                                      for j in range(len(names))])
            logged["final/confusion_matrix"] = wandb.plot.plot_table(
                "wandb/confusion_matrix/v1", table,
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": f"{record.experiment} {record.split}: pixels (rows: ground truth), step {record.steps}"})
        run.log(logged)
        offline = getattr(run.settings, "mode", "") == "offline" or getattr(run, "offline", False)
        if offline:
            where = Path(run.dir).parent
            print(f"W&B offline run: {where} (`wandb sync {where}` uploads it)")
        elif model_path is not None:  # the weights-only final model (Lightning's upload followed ModelCheckpoint)
            artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"step": record.steps})
            artifact.add_file(str(model_path))
            run.log_artifact(artifact, aliases=["final"])


def _finite(value) -> Optional[float]:
    return None if value is None or value != value else float(value)


def device_description(trainer) -> str:
    import torch

    if trainer.strategy.root_device.type == "cuda":
        return f"{trainer.world_size} x {torch.cuda.get_device_name(trainer.strategy.root_device)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores) x {trainer.world_size}"


def finish_loggers(trainer) -> None:
    """Write the CSV log and close the W&B run: the next run in this process (a sweep, a test) starts its own."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
        else:
            logger.finalize("finished")
