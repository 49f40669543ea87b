"""Checkpoints are data, never code: how a run is stored in them and loaded back.

Every file this project reads from someone else (a checkpoint of `fit`, a model file, a cache) is read
with `torch.load(..., weights_only=True)`, which unpickles tensors and plain Python containers only
and refuses anything that could run code. What a checkpoint needs besides tensors is stored as plain
types: under `checkpoint["deeplab_lit"]`, the resolved config as a plain dict and the class names.

Two kinds of file, both read by `load_run`:
- `last.ckpt`: Lightning's full training state (network, optimizer, schedulers, loops, random states,
  data position): what resuming needs.
- a model file (`model.pt`, and `best-on-val.pt` with `keep_best_on_val`): `{"format": MODEL_FORMAT,
  "deeplab_lit": {... "weights": "final" | "best-on-val", "step": N}, "state_dict": the network's own
  state dict (no Lightning prefix), "global_step": N}`: about a third of `last.ckpt`, what predict,
  export, evaluate and `deeplab_lit.load_checkpoint` need.

    run = load_run("runs/v3/default-seed0/checkpoints/model.pt", ["eval.output_stride=8"])
    run.spec          # the RunSpec, resolved from the stored config plus evaluation overrides
    run.network()     # the network with the file's weights (never the ImageNet file)

A file that cannot be read this way, that was not written by this project, or whose weights do not fit
the network of its stored config is one line naming the file and what it is.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from deeplab_lit.config import RunSpec, resolve_stored
from deeplab_lit.errors import UserError

FORMAT = 1
KEY = "deeplab_lit"
NETWORK_PREFIX = "model."  # the LightningModule's attribute holding the network
MODEL_FORMAT = "deeplab_lit.model/1"  # the top-level "format" of a weights-only model file
MODEL_FILE = "model.pt"  # the final weights of a run, in <run dir>/checkpoints/
BEST_ON_VAL_FILE = "best-on-val.pt"  # keep_best_on_val: selected on val, never the paper comparison
FINAL, BEST_ON_VAL = "final", "best-on-val"


def run_payload(spec: RunSpec) -> dict:
    """What a checkpoint carries besides tensors, as plain types."""
    return {"format": FORMAT, "config": spec.to_dict(), "class_names": list(spec.dataset.class_names)}


def read_checkpoint(path: str | Path, what: str = "--checkpoint") -> dict:
    """`torch.load(weights_only=True)` with every failure as one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file; fit writes checkpoints to runs/<experiment>/.../checkpoints/")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global:?)\s+(?:GLOBAL\s+)?([\w.]+)", str(error))
        if found:  # a pickle naming a callable: what code execution through a checkpoint looks like
            raise UserError(f"{what} {path}: refused: it would import {found.group(1)} (Python objects other "
                            "than tensors and plain data are never loaded); is it from a trusted deeplab_lit run?"
                            ) from None
        raise UserError(f"{what} {path}: cannot be read as a checkpoint (not a PyTorch file or damaged)") from None
    except Exception as error:  # truncated, not a torch file, a directory, ...
        raise UserError(f"{what} {path}: cannot be read as a checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{what} {path}: not a checkpoint (a {type(checkpoint).__name__}, not a mapping)")
    return checkpoint


def save_model_file(path: str | Path, network: torch.nn.Module, spec: RunSpec, step: int,
                    weights: str = FINAL) -> Path:
    """Write a weights-only model file (atomically): the network's weights, the resolved config and the
    class names as plain data, the step and which weights they are (`final` or `best-on-val`)."""
    from deeplab_lit.files import atomic_write

    state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in network.state_dict().items()}
    content = {"format": MODEL_FORMAT, KEY: {**run_payload(spec), "weights": weights, "step": int(step)},
               "state_dict": state, "global_step": int(step)}
    return atomic_write(path, lambda stream: torch.save(content, stream))


@dataclass(frozen=True)
class LoadedRun:
    """A run read back from a checkpoint or model file."""

    path: Path
    spec: RunSpec
    state_dict: dict  # the network's weights, without the LightningModule prefix
    step: Optional[int]
    checkpoint: dict  # the whole file's content (for resuming), plain data and tensors

    @property
    def is_model_file(self) -> bool:
        return self.checkpoint.get("format") == MODEL_FORMAT

    @property
    def weights(self) -> str:
        """`final`, `best-on-val` (model files) or `checkpoint` (a Lightning checkpoint: last.ckpt)."""
        return str(self.checkpoint[KEY].get("weights", FINAL)) if self.is_model_file else "checkpoint"

    def network(self, device: str | torch.device = "cpu"):
        """The network of the stored config with these weights (`model.pretrained` is not read again)."""
        from deeplab_lit.models import build_model

        model_cfg = dataclasses.replace(self.spec.config.model, pretrained="none")
        network = build_model(model_cfg, self.spec.dataset.num_classes)
        load_network_state(network, self.state_dict, self.path)
        return network.to(device)


def load_network_state(network: torch.nn.Module, state: dict, path: str | Path) -> None:
    """Load weights strictly; a mismatch is one line saying how many keys differ, with an example."""
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        example = (wrong or missing or unexpected)[0]
        raise UserError(f"checkpoint {path} does not fit the network of its stored config ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors, e.g. {example}); is it "
                        "from another version or another network?")
    network.load_state_dict(state)


def load_run(path: str | Path, overrides: Iterable[str] = (), what: str = "--checkpoint",
             updates: Optional[dict] = None) -> LoadedRun:
    """Read a checkpoint of `fit` (or a model file) and resolve its run with evaluation-time overrides
    (strings, and a nested dict of values such as a `crf:` section)."""
    path = Path(path)
    checkpoint = read_checkpoint(path, what)
    payload = checkpoint.get(KEY)
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise UserError(f"{what} {path}: not a checkpoint written by deeplab_lit (no stored run config); "
                        "evaluate checkpoints of `python -m deeplab_lit.fit`")
    if payload.get("format") != FORMAT:
        raise UserError(f"{what} {path}: checkpoint format {payload.get('format')!r}, this version reads {FORMAT}")
    if "format" in checkpoint and checkpoint["format"] != MODEL_FORMAT:
        raise UserError(f"{what} {path}: model file format {checkpoint['format']!r}, this version reads "
                        f"{MODEL_FORMAT}")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} {path}: holds no network weights (state_dict)")
    if any(k.startswith(NETWORK_PREFIX) for k in state):
        state = {k[len(NETWORK_PREFIX):]: v for k, v in state.items() if k.startswith(NETWORK_PREFIX)}
    spec = resolve_stored(payload["config"], overrides, f"checkpoint {path}", updates=updates)
    if list(spec.dataset.class_names) != list(payload.get("class_names", spec.dataset.class_names)):
        raise UserError(f"{what} {path}: its classes differ from data.name={spec.config.data.name}'s")
    step = checkpoint.get("global_step")
    return LoadedRun(path, spec, state, int(step) if isinstance(step, int) else None, checkpoint)
