"""Training plumbing that keeps runs recoverable: atomic checkpoints, save on SIGTERM, resume."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from deeplab_lit.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `path.tmp`, fsync, then rename: a killed job never leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


class SaveOnSigterm(Callback):
    """A plain SIGTERM (preemption without SLURM's SIGUSR1 warning) saves `last.ckpt` before exiting."""

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
