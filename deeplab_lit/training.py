"""Training one resolved run, recoverably: the run directory, checkpoints, preemption, the final evaluation.

`train(spec)` is what `python -m deeplab_lit.fit` runs:

1. Everything that can fail on bad input fails before anything is written: the Trainer is built (its
   arguments checked by Lightning), the dataset is found and listed, the network is built (ImageNet
   weights read), the run directory is checked for writability.
2. The run directory (`spec.default_run_dir()` unless given) is locked for this process (`files.RunLock`;
   a second copy of the same command stops in one line naming the PID); `config.yaml` is written.
3. Lightning trains, resuming from the newest of `last.ckpt` and Lightning's SLURM `hpc_ckpt_*.ckpt` if
   one exists (or `--resume PATH`). `last.ckpt`, the full training state, is written (atomically) after
   every validation, on SIGTERM and at the end; it is read back as data (`weights_only=True`) and carries
   the resolved config as plain types (`checkpoints.run_payload`). No other full copy is kept.
4. SIGTERM (a scheduler's preemption, sent to the whole process group) saves `last.ckpt` and exits with
   143, so the scheduler and `wandb agent` see an interrupted run; the same command resumes. DataLoader
   workers ignore SIGTERM and leave it to the main process (datamodules/loaders.py).
5. At the end the final weights (the end of the schedule, what the papers report) are written as the
   weights-only `model.pt` and evaluated under every protocol of the experiment (with `crf.search`, after
   the papers' cross-validation of the CRF on val images, `_search_crf`); the summary record
   (`summary.json`, each number with the file and step that produced it) and the per-class table follow.
   With `keep_best_on_val: true`, `best-on-val.pt` holds the weights of the best `val/mIoU` seen during
   training: selected on the evaluation split, labelled so wherever it appears, never the paper comparison.

A run that fails before its first optimizer step leaves no run directory behind if it created it.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules import build_datamodule
from deeplab_lit.checkpoints import (
    BEST_ON_VAL, BEST_ON_VAL_FILE, KEY, MODEL_FILE, read_checkpoint, run_payload, save_model_file)
from deeplab_lit.config import RunSpec
from deeplab_lit.crf_validation import search_run, with_best
from deeplab_lit.errors import UserError
from deeplab_lit.evaluation import main_confusion, print_results, run_evaluation
from deeplab_lit.files import RunLock, atomic_write, check_writable_dir, write_text_atomic
from deeplab_lit.modules import build_module
from deeplab_lit.records import SummaryRecord
from deeplab_lit.trainer import (
    build_trainer, csv_metrics_logger, device_description, finish_loggers, log_final_results, run_columns,
    slurm_plugins, wandb_logger)

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


LAST_FILE = "last.ckpt"


class SaveLast(Callback):
    """`last.ckpt`, the full training state, after every validation of training (one file, replaced
    atomically); the final state is saved by `_fit` whatever the validation interval."""

    def __init__(self, checkpoint_dir: Path):
        self.path = Path(checkpoint_dir) / LAST_FILE

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            trainer.save_checkpoint(str(self.path), weights_only=False)


class KeepBestOnVal(Callback):
    """`keep_best_on_val`: the network weights with the best `val/mIoU` of the validations during training,
    as a weights-only `best-on-val.pt`. The weights are selected on the evaluation split, so their number is
    biased upward: it is an option for inspection, never what fit reports or the report compares."""

    def __init__(self, spec: RunSpec, checkpoint_dir: Path):
        self.spec = spec
        self.path = Path(checkpoint_dir) / BEST_ON_VAL_FILE
        self.best: Optional[float] = None
        self.step: Optional[int] = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/mIoU")
        if value is None or not torch.isfinite(value) or (self.best is not None and float(value) <= self.best):
            return
        self.best, self.step = float(value), int(trainer.global_step)
        if trainer.is_global_zero:
            save_model_file(self.path, pl_module.model, self.spec, self.step, weights=BEST_ON_VAL)

    def state_dict(self) -> dict:  # plain numbers: travels in last.ckpt, so a resumed run keeps its best
        return {"best": self.best, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.step = state.get("best"), state.get("step")

    def record(self) -> Optional[dict]:
        if self.step is None:
            return None
        return {"checkpoint": str(self.path), "step": self.step, "val_mIoU_at_selection": self.best,
                "note": "best-on-val: selected on the evaluation split during training (biased upward); "
                        "not the reported number, never compared with the paper"}


class SaveOnSigterm(Callback):
    """A SIGTERM (preemption without SLURM's SIGUSR1 warning) saves `last.ckpt` before exiting."""

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(str(self.checkpoint_dir / LAST_FILE), weights_only=False)
            for logger in trainer.loggers:
                logger.finalize("interrupted")


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


def check_resume_checkpoint(path: str, spec: RunSpec) -> Optional[int]:
    """A checkpoint to resume from is data (weights_only) and belongs to this run's network; its step."""
    checkpoint = read_checkpoint(path, "resume checkpoint")
    payload = checkpoint.get(KEY)
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise UserError(f"resume checkpoint {path}: not written by deeplab_lit.fit; delete it or give --run-dir")
    stored_model = payload["config"].get("model")
    if stored_model != spec.to_dict()["model"]:
        raise UserError(f"resume checkpoint {path} was trained with another model config; give another --run-dir")
    step = checkpoint.get("global_step")
    return int(step) if isinstance(step, int) else None


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
    resume_step = check_resume_checkpoint(resume_path, spec) if resume_path else None

    best = [KeepBestOnVal(spec, checkpoint_dir)] if config.keep_best_on_val else []
    # Best-on-val first: its state (best score, step) is part of the last.ckpt saved right after it.
    trainer = build_trainer(spec, root_dir=run_path,
                            callbacks=[*best, SaveLast(checkpoint_dir), RunPayload(spec),
                                       SaveOnSigterm(checkpoint_dir), *callbacks],
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
        _fit(spec, trainer, datamodule, module, run_path, resume_path, resume_step)
        return _final_evaluation(spec, trainer, datamodule, module, best[0] if best else None, run_path, started)
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
        finish_loggers(trainer)


def _fit(spec: RunSpec, trainer, datamodule, module, run_path: Path, resume_path: Optional[str],
         resume_step: Optional[int]) -> None:
    columns = run_columns(spec, trainer)
    loggers = [csv_metrics_logger(run_path, resume_step)]  # always: metrics.csv beside the checkpoints
    if spec.config.wandb.mode != "disabled":
        run_config = {**spec.to_dict(), "protocol": columns, "overrides": list(spec.overrides),
                      "run_dir": str(run_path)}
        loggers.append(wandb_logger(spec, run_path, run_config))
    trainer.loggers = loggers
    if trainer.is_global_zero:
        write_text_atomic(run_path / "config.yaml", spec.to_yaml())
        if resume_path:
            print(f"resuming from {resume_path}")
        if len(loggers) > 1:  # lets `evaluate --wandb.resume=true` log into this run
            write_text_atomic(run_path / "wandb_id", loggers[1].experiment.id)
    # Lightning looks for a stateful DataLoader; ours resumes mid-epoch through the DataModule's state
    # (the batches already trained are skipped, tests/test_fit.py checks identical weights).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Frozen BatchNorm layers (model.bn=frozen, v2) stay in eval mode by design (models/batchnorm.py).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path, weights_only=True)
    # The final state, whatever the validation interval: what a later resume starts from.
    trainer.save_checkpoint(str(run_path / "checkpoints" / LAST_FILE), weights_only=False)


def _final_evaluation(spec: RunSpec, trainer, datamodule, module, best: Optional[KeepBestOnVal], run_path: Path,
                      started: float) -> int:
    """The final weights (the end of the schedule, as the papers report) as `model.pt`, evaluated under
    every protocol of the experiment; the summary record; the table; W&B's per-class table and confusion
    matrix."""
    config = spec.config
    step = trainer.global_step
    model_path = run_path / "checkpoints" / MODEL_FILE
    crf_search = _search_crf(spec, trainer, datamodule, module)
    if trainer.is_global_zero:
        # With a CRF search, the values found travel with the weights: evaluate, predict and the load API
        # of model.pt refine with them (summary.json keeps the configured ones and `crf_search`).
        searched = dataclasses.replace(spec, config=dataclasses.replace(config, crf=module.crf))
        save_model_file(model_path, module.model, searched if crf_search else spec, step)
    results = run_evaluation(trainer, module, datamodule, spec.protocols, checkpoint=str(model_path), step=step)
    if not trainer.is_global_zero:
        return 0
    best_record = best.record() if best is not None else None
    record = SummaryRecord(
        kind="fit", experiment=config.name, split="val", results=results, config=spec.to_dict(),
        class_names=list(spec.dataset.class_names), seed=config.seed, description=config.description,
        ablation=config.ablation, overrides=list(spec.overrides), protocol=run_columns(spec, trainer),
        paper=spec.to_dict()["paper"], checkpoint=str(model_path), steps=step,
        wall_time_s=round(time.time() - started, 1), device=device_description(trainer), weights="final",
        best_on_val=best_record, crf_search=crf_search)
    summary_path = record.write(run_path / "checkpoints" / "summary.json")
    print_results(results, spec.dataset.class_names,
                  title=f"{config.name}: final weights, step {step} ({model_path.name})")
    if best_record is not None:
        print(f"best-on-val (selected on val, not comparable with the paper): {best_record['checkpoint']} "
              f"(step {best_record['step']}, val mIoU during training {100 * best_record['val_mIoU_at_selection']:.2f})")
    print(f"model: {model_path}  (full training state for resuming: {run_path / 'checkpoints' / LAST_FILE})")
    print(f"summary: {summary_path}")
    log_final_results(trainer.loggers, record, main_confusion(module),
                      summary_path=summary_path, model_path=model_path)
    return 0


CRF_SEARCH_NOTE = ("the search images are val images, also in the reported val (v1/v2 Sec. 4.1: 100 val images "
                   "cross-validate the CRF, the tables report all of val)")


def _search_crf(spec: RunSpec, trainer, datamodule, module) -> Optional[dict]:
    """With `crf.enabled` and `crf.search`: the papers' CRF protocol (v1 Sec. 4.1, v2 Sec. 4.1) before the
    final evaluation, so that every `*_crf` result of the run uses the values found.

    Global rank 0 cross-validates w1 (`bi_w`), σα (`bi_xy_std`) and σβ (`bi_rgb_std`) coarse to fine on
    `crf.search_images` val images spread evenly over the split (crf_validation.search_run), with the final
    weights, the run's main evaluation protocol for the unaries (output stride, scales, flip), on the
    module's device under the Trainer's evaluation precision; every rank then replaces the module's CRF
    parameters by the values found (a new frozen object). The search images are also part of the whole
    val set the run reports: the papers did the same (100 val images held out for the cross-validation,
    the tables on all of val); summary.json records which images they were. Returns the `crf_search`
    record of summary.json, None without the search."""
    crf = spec.config.crf
    if not (crf.enabled and crf.search):
        return None
    record = _from_rank_zero(trainer, lambda: _run_crf_search(spec, trainer, datamodule, module))
    module.crf = with_best(module.crf, record["best"])
    if trainer.is_global_zero:
        print(_search_line(record))
    return record


def _run_crf_search(spec: RunSpec, trainer, datamodule, module) -> dict:
    network = module.model
    was_training = network.training
    network.eval()
    try:
        # As the evaluation computes (autocast under bf16-mixed): the unaries and CRF the search scores
        # are those of the validation step.
        with trainer.precision_plugin.val_step_context():
            result = search_run(network, datamodule.val_dataset, spec.protocols[0], spec.config.crf,
                                spec.dataset.num_classes, module.device, spec.dataset.mean, spec.dataset.std)
    finally:
        network.train(was_training)
    return {**result.record(), "note": CRF_SEARCH_NOTE}


# How long the other ranks wait for rank 0's CRF search. The full grid on 100 images can outlast the default
# process group's 30 minutes (the full grid is about 485 CRF settings per image), and Cityscapes' images have
# about 11x VOC's pixels.
RANK_ZERO_WAIT = timedelta(hours=24)


def _from_rank_zero(trainer, compute):
    """`compute()` on global rank 0 and its value on every rank (broadcast when torch.distributed is
    initialised). The broadcast goes through a gloo group of its own whose timeout (RANK_ZERO_WAIT) covers
    a long search, where the default group's (30 minutes; NCCL's watchdog) would abort the waiting ranks.
    A failure on rank 0 is broadcast too, so the other ranks stop with it instead of waiting that long."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    group = dist.new_group(backend="gloo", timeout=RANK_ZERO_WAIT)
    try:
        box: list = [None]
        if trainer.is_global_zero:
            try:
                box = [("value", compute())]
            except BaseException as error:
                dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0, group=group)
                raise
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    kind, value = box[0]
    if kind == "error":
        raise RuntimeError(f"rank 0 failed (the other ranks stop too): {value}")
    return value


def _search_line(record: dict) -> str:
    best = record["best"]
    return (f"CRF search (v1/v2 Sec. 4.1) on {record['images']} val images, {record['settings']} settings: "
            f"w1={best['bi_w']:g}, σα={best['bi_xy_std']:g}, σβ={best['bi_rgb_std']:g} (w2={best['pos_w']:g}, "
            f"σγ={best['pos_xy_std']:g}, {best['iterations']} iterations fixed); mIoU on them "
            f"{100 * record['miou_without_crf']:.2f} -> {100 * record['best_miou']:.2f} with CRF; every *_crf "
            f"result below uses these (evaluate: --crf.bi_w={best['bi_w']:g} --crf.bi_xy_std={best['bi_xy_std']:g} "
            f"--crf.bi_rgb_std={best['bi_rgb_std']:g})")
