"""Training one resolved run, recoverably: the run directory, checkpoints, preemption, the final evaluation.

`train(spec)` is what `python -m deeplab_lit.fit` runs:

1. Everything that can fail on bad input fails before anything is written: the Trainer is built (its
   arguments checked by Lightning), the dataset is found and listed, the network is built (ImageNet
   weights read), the run directory is checked for writability.
2. The run directory (`spec.default_run_dir()` unless given) is locked for this process (`files.RunLock`;
   a second copy of the same command stops in one line naming the PID); `config.yaml` is written.
3. Lightning trains, resuming from the newest of `last.ckpt` and Lightning's SLURM `hpc_ckpt_*.ckpt` if
   one exists (or `--resume PATH`). Checkpoints are written atomically and read back as data
   (`weights_only=True`); each carries the resolved config as plain types (`checkpoints.run_payload`).
4. SIGTERM (a scheduler's preemption, sent to the whole process group) saves `last.ckpt` and exits with
   143, so the scheduler and `wandb agent` see an interrupted run; the same command resumes. DataLoader
   workers ignore SIGTERM and leave it to the main process (datamodules/loaders.py).
5. At the end the chosen checkpoint is evaluated under every protocol of the experiment; the summary
   record (`summary.json`) and the per-class table follow.

A run that fails before its first optimizer step leaves no run directory behind if it created it.
"""
from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules import build_datamodule
from deeplab_lit.checkpoints import KEY, NETWORK_PREFIX, load_network_state, read_checkpoint, run_payload
from deeplab_lit.config import RunSpec
from deeplab_lit.errors import UserError
from deeplab_lit.evaluation import print_results, run_evaluation
from deeplab_lit.files import RunLock, atomic_write, check_writable_dir, write_text_atomic
from deeplab_lit.modules import build_module
from deeplab_lit.records import SummaryRecord
from deeplab_lit.trainer import build_trainer, device_description, run_columns, slurm_plugins, wandb_logger

SIGTERM_EXIT_CODE = 143  # 128 + 15: what schedulers and shells report for a job ended by SIGTERM


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints through `files.atomic_write`: a killed job never leaves a half-written one, and two
    processes never share a temporary file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        atomic_write(path, lambda stream: torch.save(checkpoint, stream))

    def load_checkpoint(self, path, map_location=None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class RunPayload(Callback):
    """Puts the resolved run (plain types) into every checkpoint, so it can be evaluated and resumed."""

    def __init__(self, spec: RunSpec):
        self.payload = run_payload(spec)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[KEY] = self.payload


class SaveOnSigterm(Callback):
    """A SIGTERM (preemption without SLURM's SIGUSR1 warning) saves `last.ckpt` before exiting."""

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(str(self.checkpoint_dir / "last.ckpt"))


def find_resume_checkpoint(explicit: Optional[str], checkpoint_dir: Path) -> Optional[str]:
    """`--resume PATH` if given (it must exist), else the newest of the run's `last.ckpt` and the
    `hpc_ckpt_N.ckpt` that Lightning's SLURM requeue writes into the run directory on SIGUSR1."""
    if explicit:
        if not Path(explicit).is_file():
            raise UserError(f"--resume {explicit}: no such checkpoint file")
        return explicit
    checkpoint_dir = Path(checkpoint_dir)
    candidates = [checkpoint_dir / "last.ckpt", *checkpoint_dir.parent.glob("hpc_ckpt_*.ckpt")]
    existing = [path for path in candidates if path.is_file()]
    return str(max(existing, key=lambda path: path.stat().st_mtime)) if existing else None


def check_resume_checkpoint(path: str, spec: RunSpec) -> None:
    """A checkpoint to resume from is data (weights_only) and belongs to this run's network."""
    checkpoint = read_checkpoint(path, "resume checkpoint")
    payload = checkpoint.get(KEY)
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise UserError(f"resume checkpoint {path}: not written by deeplab_lit.fit; delete it or give --run-dir")
    stored_model = payload["config"].get("model")
    if stored_model != spec.to_dict()["model"]:
        raise UserError(f"resume checkpoint {path} was trained with another model config; give another --run-dir")


def _remove_unstarted(run_path: Path, created: bool) -> None:
    """Delete a run directory this process created if no training state was ever saved in it."""
    if created and run_path.is_dir() and not any(run_path.rglob("*.ckpt")):
        shutil.rmtree(run_path, ignore_errors=True)


def train(spec: RunSpec, run_dir: Optional[str] = None, resume: Optional[str] = None,
          callbacks: Sequence = ()) -> int:
    """Train, evaluate and record one run (see the module docstring). Returns the exit code."""
    started = time.time()
    config = spec.config
    run_path = Path(run_dir) if run_dir else spec.default_run_dir()
    check_writable_dir(run_path, "--run-dir" if run_dir else "output_dir")
    checkpoint_dir = run_path / "checkpoints"
    resume_path = find_resume_checkpoint(resume, checkpoint_dir)
    if resume_path:
        check_resume_checkpoint(resume_path, spec)

    best = ModelCheckpoint(dirpath=str(checkpoint_dir), filename="best-step{step}", monitor="val/mIoU", mode="max",
                           save_top_k=1, save_last=True,
                           auto_insert_metric_name=False)  # metric names contain '/', which would become directories
    monitor = [LearningRateMonitor(logging_interval="step")] if config.wandb.mode != "disabled" else []
    trainer = build_trainer(spec, root_dir=run_path,
                            callbacks=[best, RunPayload(spec), SaveOnSigterm(checkpoint_dir), *monitor, *callbacks],
                            plugins=[AtomicCheckpointIO(), *slurm_plugins()])

    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config.data)
    if trainer.is_global_zero:
        datamodule.prepare_data()
    datamodule.setup("fit")  # a missing or broken dataset fails here, before the run directory exists
    module = build_module(spec)

    created = not run_path.exists()
    lock = RunLock(run_path, f"run {run_path}").acquire() if trainer.is_global_zero else None
    try:
        _fit(spec, trainer, datamodule, module, run_path, resume_path)
        return _final_evaluation(spec, trainer, datamodule, module, best, run_path, started)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(f"terminated: saved {checkpoint_dir / 'last.ckpt'}; the same command resumes", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    except BaseException:
        if trainer.is_global_zero and trainer.global_step == 0:
            _remove_unstarted(run_path, created)
        raise
    finally:
        if lock is not None:
            lock.release()
        for logger in trainer.loggers:
            logger.experiment.finish()  # the next run in this process (a sweep, a test) starts its own


def _fit(spec: RunSpec, trainer, datamodule, module, run_path: Path, resume_path: Optional[str]) -> None:
    columns = run_columns(spec, trainer)
    if spec.config.wandb.mode != "disabled":
        run_config = {**spec.to_dict(), "protocol": columns, "overrides": list(spec.overrides),
                      "run_dir": str(run_path)}
        trainer.loggers = [wandb_logger(spec, run_path, run_config)]
    if trainer.is_global_zero:
        write_text_atomic(run_path / "config.yaml", spec.to_yaml())
        if resume_path:
            print(f"resuming from {resume_path}")
        if trainer.loggers:  # lets `evaluate --wandb.resume=true` log into this run
            write_text_atomic(run_path / "wandb_id", trainer.loggers[0].experiment.id)
    # Lightning looks for a stateful DataLoader; ours resumes mid-epoch through the DataModule's state
    # (the batches already trained are skipped, tests/test_fit.py checks identical weights).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path, weights_only=True)
    # The final state, whatever the validation interval: what a later resume or evaluation starts from.
    trainer.save_checkpoint(str(run_path / "checkpoints" / "last.ckpt"))


def _final_evaluation(spec: RunSpec, trainer, datamodule, module, best, run_path: Path, started: float) -> int:
    """The chosen checkpoint under every protocol of the experiment; the summary record; the table."""
    config = spec.config
    chosen = best.best_model_path or best.last_model_path
    step = trainer.global_step
    if chosen:
        checkpoint = read_checkpoint(chosen, "checkpoint")
        step = int(checkpoint.get("global_step", step))
        state = {k[len(NETWORK_PREFIX):]: v for k, v in checkpoint["state_dict"].items()}
        load_network_state(module.model, state, chosen)
    results = run_evaluation(trainer, module, datamodule, spec.protocols, checkpoint=str(chosen), step=step)
    if not trainer.is_global_zero:
        return 0
    record = SummaryRecord(
        kind="fit", experiment=config.name, split="val", results=results, config=spec.to_dict(),
        class_names=list(spec.dataset.class_names), seed=config.seed, description=config.description,
        ablation=config.ablation, overrides=list(spec.overrides), protocol=run_columns(spec, trainer),
        paper=spec.to_dict()["paper"], checkpoint=str(chosen), steps=trainer.global_step,
        wall_time_s=round(time.time() - started, 1), device=device_description(trainer))
    summary_path = record.write(run_path / "checkpoints" / "summary.json")
    print_results(results, spec.dataset.class_names, title=f"{config.name}: checkpoint {Path(chosen).name}")
    print(f"summary: {summary_path}")
    for logger in trainer.loggers:
        logger.experiment.summary.update({**record.metrics, "summary_json": str(summary_path)})
    return 0
