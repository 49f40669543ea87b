"""One run specification, resolved and validated once.

    spec = resolve_experiment("v3", ["model.output_stride=8"])      # an experiment of experiments/
    spec = resolve_file("my_experiment.yaml", overrides)            # a run's config.yaml or your own file
    spec = resolve_stored(checkpoint_config, overrides, source)     # what a checkpoint stored

Every path goes through `resolve`: compose the plain dict, apply overrides, check the keys (unknown
keys with a suggestion; `trainer.*` against lightning.Trainer), build the typed frozen `Config`, then
validate it in one pass, each rule owned by the package that knows it:
- the network: `models.validate` (registries, combinations, strides, multi-grid);
- the data: `datamodules.validate_data_config` (registry, crop, batch, scale range, workers);
- the CRF parameters: the `CRFParams` type itself (`crf.params`);
- the recipe, the evaluation protocols, the seed and the Trainer arguments: here.
Every error is a UserError naming the key. Downstream code receives the `RunSpec` (or parts of it)
and never parses a dict or a string again.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from deeplab_lit.config import compose
from deeplab_lit.config.schema import (
    EVALUATION, INFRASTRUCTURE, SECTIONS, Config, ProtocolConfig, key_role, plain)
from deeplab_lit.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from deeplab_lit.errors import UserError
from deeplab_lit.protocols import Protocol, check_protocol_name

OUTPUT_STRIDES = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class DatasetInfo:
    """What a run needs to know of its dataset without reading it: from the DataModule class."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB in 0..1: what deeplab_lit.preprocessing uses
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class RunSpec:
    """A resolved, validated run: the typed config and everything derived from it once."""

    config: Config
    overrides: tuple[str, ...]  # as given on the command line (for the record)
    dataset: DatasetInfo
    protocols: tuple[Protocol, ...]  # the main protocol first, then `eval.protocols`
    run_tag: str  # "default", or a digest of how the run differs from its experiment
    source: str  # "experiment v3", "config FILE" or "checkpoint PATH"

    @property
    def name(self) -> str:
        return self.config.name

    def default_run_dir(self) -> Path:
        """`output_dir/NAME/<tag>-seed<seed>`: the same command (a requeue, a crashed job started again)
        finds the same directory and resumes; runs differing only in infrastructure keys share it."""
        return Path(self.config.output_dir) / self.name / f"{self.run_tag}-seed{self.config.seed}"

    def to_dict(self) -> dict:
        return plain(self.config)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def trainer_arguments(self) -> dict:
        """The config's `trainer.*` over this project's defaults: accelerator and devices auto, bf16-mixed
        on GPUs that support it, fp32 otherwise."""
        import torch

        defaults: dict[str, Any] = {"accelerator": "auto", "devices": "auto"}
        if "precision" not in self.config.trainer:
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            defaults["precision"] = "bf16-mixed" if bf16 else "32-true"
        return {**defaults, **self.config.trainer, "benchmark": self.config.perf.cudnn_benchmark}

    def base_run_dir(self) -> Optional[Path]:
        """For `model.pretrained: run:<experiment>`: that experiment's default run directory, same seed."""
        base = run_reference(self.config.model.pretrained)
        if base is None:
            return None
        overrides = [f"seed={self.config.seed}", f"output_dir={self.config.output_dir}"]
        return resolve_experiment(base, overrides).default_run_dir()

    def model_for_training(self):
        """The model config `build_model` trains from: `run:<experiment>` becomes that finished run's
        final weights (one line names the command that makes them when they are missing)."""
        base_dir = self.base_run_dir()
        if base_dir is None:
            return self.config.model
        base = run_reference(self.config.model.pretrained)
        checkpoints = base_dir / "checkpoints"
        weights = next((p for p in (checkpoints / "model.pt", checkpoints / "last.ckpt") if p.is_file()), None)
        if weights is None or not (checkpoints / "summary.json").is_file():
            raise UserError(
                f"model.pretrained=run:{base}: no finished run of {base} (seed {self.config.seed}) in {base_dir}; "
                f"train it first: python -m deeplab_lit.fit --experiment {base} --seed={self.config.seed}"
                + (f" --output_dir={self.config.output_dir}" if self.config.output_dir != "runs" else ""))
        return dataclasses.replace(self.config.model, pretrained=str(weights))

    def with_overrides(self, overrides: Iterable[str], allowed_roles=(EVALUATION, INFRASTRUCTURE)) -> "RunSpec":
        """This run with evaluation-time overrides (evaluate, predict): keys that would change the trained
        network are refused."""
        return resolve_stored(self.to_dict(), overrides, self.source, allowed_roles)


# ---------------------------------------------------------------------------------------------------
# Entry points


def resolve_experiment(name: str, overrides: Iterable[str] = ()) -> RunSpec:
    return resolve(compose.compose_experiment(name), tuple(overrides), f"experiment {name}")


def resolve_file(path: str | Path, overrides: Iterable[str] = ()) -> RunSpec:
    """A config file: a run's `config.yaml`, `--print-config` output, or a user's own experiment file
    (with `base:` entries from experiments/base). Its `name` defaults to the file's stem."""
    raw = compose.compose(Path(path), "--config")
    raw.setdefault("name", Path(path).stem)
    return resolve(raw, tuple(overrides), f"config {path}")


def resolve_stored(stored: dict, overrides: Iterable[str], source: str,
                   allowed_roles=(EVALUATION, INFRASTRUCTURE), updates: Optional[dict] = None) -> RunSpec:
    """A stored resolved config (a checkpoint's) with overrides limited to `allowed_roles`; `updates` is a
    nested dict of further values (e.g. a `crf:` section read from a file), checked the same way.

    The training run's batch limits (`trainer.limit_*_batches`, which count per rank) do not carry over:
    they must not shrink an evaluation."""
    overrides = tuple(overrides)
    keys = [compose.parse_override(o)[0] for o in overrides] + list(flat(updates or {}))
    for key in keys:
        if key_role(key) not in allowed_roles:
            raise UserError(
                f"override {key} changes the trained network; here only evaluation and infrastructure keys "
                "apply (eval.*, crf.*, data.root, data.num_workers, data.eval_batch_size, trainer.devices, "
                "trainer.precision, trainer.limit_val_batches, wandb.*, ...)")
    raw = json.loads(json.dumps(stored))  # a deep copy of plain data
    raw["trainer"] = {k: v for k, v in (raw.get("trainer") or {}).items() if not k.startswith("limit_")}
    compose.deep_merge(raw, json.loads(json.dumps(updates or {})))
    return resolve(raw, overrides, source)


def resolve(raw: dict, overrides: tuple[str, ...], source: str) -> RunSpec:
    baseline = _baseline(raw)
    compose.apply_overrides(raw, overrides)
    config = validate(config_from_dict(raw))
    dataset = dataset_info(config)
    return RunSpec(config=config, overrides=overrides, dataset=dataset, protocols=build_protocols(config),
                   run_tag=_run_tag(config, baseline), source=source)


# ---------------------------------------------------------------------------------------------------
# Typing


def config_from_dict(raw: dict) -> Config:
    """Check the keys (unknown ones named, with a suggestion) and build the typed Config."""
    _check_keys(raw, Config, "")
    parser = _parser()
    try:
        namespace = parser.parse_object({"cfg": raw})
        return parser.instantiate(namespace).cfg
    except UserError:
        raise
    except Exception as error:  # jsonargparse raises ArgumentError/TypeError with a multi-line text
        raise UserError(_jsonargparse_message(str(error))) from None


def _check_keys(raw: Any, cls, prefix: str) -> None:
    if not isinstance(raw, dict):
        raise UserError(f"config key '{prefix[:-1]}' is a section; set its keys, e.g. {prefix}<key>=...")
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields_:
            hint = difflib.get_close_matches(str(key), list(fields_), n=1)
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise UserError(f"unknown config key '{dotted}'" + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else "")
                            + f"; valid keys in {where}: {', '.join(fields_)}")
        section = SECTIONS.get(key) if not prefix else None
        if section is not None:
            _check_keys(value, section, dotted + ".")
        elif dotted == "trainer":
            _check_trainer_keys(value)
        elif dotted == "eval.protocols":
            _check_protocol_entries(value)


def _check_protocol_entries(entries: Any) -> None:
    if not isinstance(entries, list):
        raise UserError("eval.protocols must be a list of {name: ..., output_stride: ..., scales: [...], flip: ...}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"eval.protocols[{index}] = {entry!r}: each protocol is a mapping with a name, e.g. "
                            "{name: os8, output_stride: 8}")
        _check_keys(entry, ProtocolConfig, f"eval.protocols[{index}].")


def _trainer_parameters() -> list[str]:
    from lightning import Trainer

    return [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]


def _check_trainer_keys(trainer: Any) -> None:
    if not isinstance(trainer, dict):
        raise UserError("config key 'trainer' is a section of lightning.Trainer arguments")
    valid = _trainer_parameters()
    for key in trainer:
        if key not in valid:
            hint = difflib.get_close_matches(str(key), valid, n=1)
            raise UserError(f"unknown config key 'trainer.{key}': not an argument of lightning.Trainer"
                            + (f" (did you mean 'trainer.{hint[0]}'?)" if hint else ""))


_PARSER = None


def _parser():
    global _PARSER
    if _PARSER is None:
        from jsonargparse import ArgumentParser

        _PARSER = ArgumentParser(exit_on_error=False)
        _PARSER.add_class_arguments(Config, "cfg")
    return _PARSER


def _jsonargparse_message(text: str) -> str:
    """jsonargparse's multi-line 'Parser key "cfg.x": Expected ... Got value: v' as one line."""
    text = compose.one_line(text).replace('Parser key "cfg.', 'config key "').replace("typing.", "")
    return text.replace("Expected a Literal[", "expected one of [")


# ---------------------------------------------------------------------------------------------------
# Validation: one pass, each rule once


def validate(config: Config) -> Config:
    from datamodules import validate_data_config
    from deeplab_lit.models import validate as validate_model

    if not config.name:
        raise UserError("the config has no name; set name: ... in the file")
    _check_int("seed", config.seed, low=0, high=2**32 - 1)
    validate_data_config(config.data)
    base = run_reference(config.model.pretrained)
    if base is not None and base not in compose.experiment_names():
        raise UserError(f"model.pretrained=run:{base}: no experiment {base!r}; `fit --list` lists them")
    validate_model(dataclasses.replace(config.model, pretrained="none") if base else config.model,
                   dataset_info(config).num_classes)
    _validate_optim(config)
    _validate_crf_search(config)
    build_protocols(config)
    _validate_trainer(config.trainer)
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(key: str, value: Any, low: int, high: Optional[int] = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise UserError(f"{key}={value!r} must be an integer {bound}")


def _check_number(key: str, value: Any, *, positive: bool = False, low: float = -math.inf,
                  below: float = math.inf) -> None:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not real or (positive and value <= 0) or value < low or value >= below:
        rule = "a positive number" if positive else f"a number in [{low:g}, {below:g})"
        raise UserError(f"{key}={value!r} must be {rule}")


def _validate_crf_search(config: Config) -> None:
    # The search picks the CRF that the run reports, so it only runs (and is only checked) with the CRF on:
    # `crf.enabled=false` on a searched row is the row without CRF, not a mistake.
    if config.crf.enabled and config.crf.search:
        _check_int("crf.search_images", config.crf.search_images, low=1)
        # Kernel weights are >= 0 and standard deviations > 0: the values CRFParams accepts for w1, sigmas.
        for name, positive in (("bi_w", False), ("bi_xy_std", True), ("bi_rgb_std", True)):
            values = getattr(config.crf, f"search_{name}")
            if not values:
                raise UserError(f"crf.search_{name}=[]: give at least one value to search")
            for value in values:
                _check_number(f"crf.search_{name}", value, positive=positive, low=0)


def _validate_optim(config: Config) -> None:
    optim = config.optim
    _check_number("optim.lr", optim.lr, positive=True)
    _check_number("optim.momentum", optim.momentum, low=0, below=1)
    _check_number("optim.weight_decay", optim.weight_decay, low=0)
    _check_number("optim.poly_power", optim.poly_power, positive=True)
    _check_int("optim.step_size", optim.step_size, low=1)
    _check_number("optim.step_gamma", optim.step_gamma, positive=True)
    _check_number("optim.new_lr_mult", optim.new_lr_mult, positive=True)
    _check_number("optim.bias_lr_mult", optim.bias_lr_mult, positive=True)


def build_protocols(config: Config) -> tuple[Protocol, ...]:
    """The main protocol (`eval.*`, `crf.enabled`) followed by `eval.protocols`, each validated."""
    main = Protocol(name="", output_stride=config.eval.output_stride or config.model.output_stride,
                    scales=tuple(float(s) for s in config.eval.scales), flip=config.eval.flip, mode=config.eval.mode,
                    slide_crop=config.eval.slide_crop, slide_stride=config.eval.slide_stride,
                    canvas=tuple(int(c) for c in config.eval.canvas), crf=config.crf.enabled)
    protocols = [_checked_protocol(main, "eval", config)]
    for index, entry in enumerate(config.eval.protocols):
        where = f"eval.protocols[{index}]"
        problem = check_protocol_name(entry.name)
        if problem:
            raise UserError(f"{where}.name={entry.name!r} {problem}")
        if entry.name in {p.name for p in protocols}:
            raise UserError(f"{where}.name={entry.name!r} is used twice; every protocol needs its own name")
        given = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry) if getattr(entry, f.name) is not None}
        if "scales" in given:
            given["scales"] = tuple(float(s) for s in given["scales"])
        if "canvas" in given:
            given["canvas"] = tuple(int(c) for c in given["canvas"])
        protocols.append(_checked_protocol(dataclasses.replace(main, crf=False, **given), where, config))
    return tuple(protocols)


def _checked_protocol(protocol: Protocol, where: str, config: Config) -> Protocol:
    from deeplab_lit.models import supported_output_strides

    if protocol.output_stride not in OUTPUT_STRIDES:
        raise UserError(f"{where}.output_stride={protocol.output_stride} is not valid; choose one of 8, 16, 32 (64, "
                        "128, 256 with cascaded blocks)")
    supported = supported_output_strides(config.model)
    if protocol.output_stride not in supported:
        raise UserError(f"{where}.output_stride={protocol.output_stride}: model.backbone={config.model.backbone} "
                        f"evaluates at output stride {', '.join(map(str, supported))} only")
    if not protocol.scales or any(not isinstance(s, numbers.Real) or not 0 < s <= 8 for s in protocol.scales):
        raise UserError(f"{where}.scales={list(protocol.scales)}: needs one or more positive scales (at most 8)")
    if protocol.mode == "slide":
        _check_int(f"{where}.slide_crop", protocol.slide_crop, low=1)
        _check_int(f"{where}.slide_stride", protocol.slide_stride, low=1)
    if protocol.canvas and (len(protocol.canvas) != 2 or min(protocol.canvas) < 1):
        raise UserError(f"{where}.canvas={list(protocol.canvas)}: give [height, width] in pixels, or [] for none")
    return protocol


def _validate_trainer(trainer) -> None:
    """Values Lightning would reject only after data and model are built, or that would break the recipe."""
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    from typing import get_args

    if "benchmark" in trainer:  # one key for it, recorded as infrastructure
        raise UserError("trainer.benchmark: use perf.cudnn_benchmark=true|false instead")
    steps = trainer.get("max_steps")
    if not _is_int(steps) or steps < 1:
        raise UserError(f"trainer.max_steps={steps!r} must be a positive number of steps (the schedule is defined by it)")
    if "devices" in trainer:
        devices = trainer["devices"]
        ok = (devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1))
              or (isinstance(devices, (list, tuple)) and devices and all(_is_int(d) and d >= 0 for d in devices))
              or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit() and devices.strip() != "0"))
        if not ok:
            raise UserError(f"trainer.devices={devices!r} must be a positive count, -1 (all), a list of device "
                            "indices, or auto")
    if "num_nodes" in trainer:
        _check_int("trainer.num_nodes", trainer["num_nodes"], low=1)
    if "precision" in trainer:
        allowed = [str(v) for part in get_args(_PRECISION_INPUT) for v in (get_args(part) or [part])]
        if str(trainer["precision"]) not in allowed:
            raise UserError(f"trainer.precision={trainer['precision']!r} is not a Lightning precision; choose one "
                            f"of {', '.join(allowed)}")
    if "accelerator" in trainer:
        from lightning.pytorch.accelerators import AcceleratorRegistry

        choices = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
        if trainer["accelerator"] not in choices:
            raise UserError(f"trainer.accelerator={trainer['accelerator']!r} is not one of {', '.join(choices)}")
    if "strategy" in trainer:
        from lightning.pytorch.strategies import StrategyRegistry

        choices = ["auto", *StrategyRegistry.available_strategies()]
        if trainer["strategy"] not in choices:
            hint = difflib.get_close_matches(str(trainer["strategy"]), choices, n=1)
            raise UserError(f"trainer.strategy={trainer['strategy']!r} is not a Lightning strategy"
                            + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    for name in ("accumulate_grad_batches", "log_every_n_steps"):
        if name in trainer:
            _check_int(f"trainer.{name}", trainer[name], low=1)
    if trainer.get("val_check_interval") is not None:
        interval = trainer["val_check_interval"]
        if not ((_is_int(interval) and interval >= 1) or (isinstance(interval, float) and 0 < interval <= 1)):
            raise UserError(f"trainer.val_check_interval={interval!r} must be a number of steps >= 1 or a fraction "
                            "of an epoch in (0, 1]")
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if trainer.get(name) is not None:
            value = trainer[name]
            if not ((_is_int(value) and value >= 0) or (isinstance(value, float) and 0 <= value <= 1)):
                raise UserError(f"trainer.{name}={value!r} must be a number of batches >= 0 or a fraction in [0, 1]")


RUN_PREFIX = "run:"


def run_reference(pretrained: str) -> Optional[str]:
    """The experiment named by `model.pretrained: run:<experiment>`, else None."""
    return pretrained[len(RUN_PREFIX):] if pretrained.startswith(RUN_PREFIX) else None


def dataset_info(config: Config) -> DatasetInfo:
    from datamodules import DATAMODULES

    cls = DATAMODULES[config.data.name]
    return DatasetInfo(config.data.name, cls.num_classes, tuple(cls.class_names), tuple(cls.mean), tuple(cls.std))


# ---------------------------------------------------------------------------------------------------
# Run identity


def flat(config_dict: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value (lists and protocol lists are leaves)."""
    out = {}
    for key, value in config_dict.items():
        if isinstance(value, dict) and key != "metrics" and (prefix or key in SECTIONS or key == "trainer"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_changes(config: Config, baseline: Optional[Config]) -> dict[str, Any]:
    """Keys (not infrastructure, not the seed) whose values differ from the experiment's own."""
    ours = flat(plain(config))
    theirs = flat(plain(baseline)) if baseline is not None else {}
    return {key: value for key, value in sorted(ours.items())
            if key != "seed" and key_role(key) != INFRASTRUCTURE and theirs.get(key, _MISSING) != value}


_MISSING = object()


def _baseline(raw: dict) -> Optional[Config]:
    """The experiment of the same name as shipped, if there is one; else the given config itself."""
    name = raw.get("name")
    try:
        source = compose.compose_experiment(name) if name in compose.experiment_names() else json.loads(json.dumps(raw))
        return config_from_dict(source)
    except UserError:
        return None


def _run_tag(config: Config, baseline: Optional[Config]) -> str:
    changes = run_changes(config, baseline)
    if baseline is not None and not changes:
        return "default"
    return hashlib.sha1(json.dumps(changes, sort_keys=True, default=str).encode()).hexdigest()[:8]
