"""Experiments: load, compose, override, validate, resolved once into a typed run specification.

    from deeplab_lit.config import load_experiment, resolve_experiment
    cfg = load_experiment("v3", overrides=["model.output_stride=8"])    # the typed, frozen Config
    spec = resolve_experiment("v3", ["model.output_stride=8"])          # Config + dataset, protocols, run tag

- schema.py: the keys (types, defaults, one line of doc, role: run / evaluation / infrastructure);
- compose.py: experiment files, `base:` composition, overrides, where experiments/ and sweeps/ are;
- resolve.py: the one validation pass and the `RunSpec`;
- help.py: `--help`, generated from the schema.
"""
from deeplab_lit.config.compose import (
    data_dir, experiment_names, experiments_dir, parse_override, split_overrides)
from deeplab_lit.config.resolve import (
    DatasetInfo, RunSpec, build_protocols, config_from_dict, flat, resolve_experiment, resolve_file,
    resolve_stored, run_changes)
from deeplab_lit.config.schema import (
    EVALUATION, INFRASTRUCTURE, RUN, Config, CRFConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig,
    PaperConfig, PerfConfig, ProtocolConfig, WandbConfig, key_role, plain)


def load_experiment(name: str, overrides=()) -> Config:
    """Resolve experiment `name` (bases, then the file, then `overrides`) into a validated Config."""
    return resolve_experiment(name, overrides).config


def list_experiments() -> dict[str, str]:
    """Every experiment name with the first line of its description (bases excluded)."""
    from deeplab_lit.config.compose import compose_experiment

    return {name: (str(compose_experiment(name).get("description", "")).strip().splitlines() or [""])[0]
            for name in experiment_names()}


def to_dict(cfg: Config) -> dict:
    return plain(cfg)


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(plain(cfg), sort_keys=False, default_flow_style=None)


def flat_keys() -> set[str]:
    """Every dotted key of the schema (`trainer.*` excluded: those are Trainer arguments)."""
    from deeplab_lit.config.help import key_rows

    return {row[0] for row in key_rows() if not row[0].startswith("trainer.")}


__all__ = [
    "Config", "CRFConfig", "DataConfig", "DatasetInfo", "EvalConfig", "ModelConfig", "OptimConfig", "PaperConfig",
    "PerfConfig", "ProtocolConfig", "RunSpec", "WandbConfig", "EVALUATION", "INFRASTRUCTURE", "RUN", "build_protocols",
    "config_from_dict", "data_dir", "experiment_names", "experiments_dir", "flat", "flat_keys", "key_role",
    "list_experiments", "load_experiment", "parse_override", "plain", "resolve_experiment", "resolve_file",
    "resolve_stored", "run_changes", "split_overrides", "to_dict", "to_yaml"]
