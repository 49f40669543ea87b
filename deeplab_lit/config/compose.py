"""Experiment files: where they are, `base:` composition, and `--key=value` overrides, as plain dicts.

An experiment is a YAML file in `experiments/` holding a few keys on top of shared bases named by its
`base:` entry (a name or a list of names in `experiments/base/`, resolved recursively, later files
winning). A user's own file (`fit --config FILE`) is composed the same way, its bases taken from
`experiments/base/`. Overrides are dotted strings such as `"model.output_stride=8"` whose values are
read as YAML. Everything here produces plain dicts; typing and validation happen in `resolve.py`.

The experiments and sweeps ship inside the package as `deeplab_lit/_data/{experiments,sweeps}`: in a
source checkout these are links to the repository's own folders (an edited experiment takes effect
without reinstalling); an installed package holds copies, found from any directory.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from deeplab_lit.errors import UserError

_PACKAGE = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """`experiments` or `sweeps`, as shipped with the package (see the module docstring)."""
    return _PACKAGE / "_data" / name


def experiments_dir() -> Path:
    return data_dir("experiments")


def experiment_names() -> list[str]:
    return sorted(path.stem for path in experiments_dir().glob("*.yaml"))


def experiment_path(name: str) -> Path:
    """The file of experiment `name`; a path or an unknown name is refused with a hint."""
    if not name or "/" in name or "\\" in name or name.endswith((".yaml", ".yml")) or name.startswith("."):
        raise UserError(f"--experiment {name!r}: give an experiment name from `python -m deeplab_lit.fit --list`; "
                        "for a file of your own use --config FILE")
    path = experiments_dir() / f"{name}.yaml"
    if not path.is_file():
        hint = difflib.get_close_matches(name, experiment_names(), n=1)
        raise UserError(
            f"unknown experiment '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + "; `python -m deeplab_lit.fit --list` lists all experiments")
    return path


def read_yaml(path: Path, what: str) -> dict:
    """A YAML mapping from `path`; anything else (missing, binary, not YAML, not a mapping) is one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{what} {path}: not a text file (binary data); give a YAML file") from None
    except yaml.YAMLError as error:
        raise UserError(f"{what} {path}: not valid YAML ({one_line(str(error))})") from None
    except OSError as error:
        raise UserError(f"{what} {path}: cannot be read ({error.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a mapping of config keys, got a {type(data).__name__}")
    return data


def compose(path: Path, what: str = "experiment file") -> dict:
    """A YAML file merged over its `base:` files (recursively; later bases and the file win)."""
    data = read_yaml(path, what)
    bases = data.pop("base", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = experiments_dir() / "base" / f"{base}.yaml"
        if not isinstance(base, str) or not base_path.is_file():
            available = ", ".join(sorted(p.stem for p in (experiments_dir() / "base").glob("*.yaml")))
            raise UserError(f"{path}: base {base!r} not found; bases are the files of experiments/base: {available}")
        deep_merge(merged, compose(base_path))
    deep_merge(merged, data)
    return merged


def compose_experiment(name: str) -> dict:
    raw = compose(experiment_path(name))
    raw["name"] = name
    return raw


_REPLACED_DICTS = {"metrics"}  # paper.metrics of a row replaces its base's, it does not extend it


def deep_merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key not in _REPLACED_DICTS:
            deep_merge(into[key], value)
        else:
            into[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`"model.output_stride=8"` -> ("model.output_stride", 8); values are read as YAML."""
    text = text[2:] if text.startswith("--") else text
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"override '{text}' is not of the form section.key=value")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"override {key}: cannot read value '{value}' (YAML syntax)") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: '{part}' is not a section")
    node[leaf] = value


def apply_overrides(raw: dict, overrides) -> dict:
    for override in overrides:
        set_dotted(raw, *parse_override(override))
    return raw


def split_overrides(args: list[str]) -> list[str]:
    """Command-line words `--model.output_stride=8` or `--model.output_stride 8` -> ["model.output_stride=8"]."""
    overrides, index = [], 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument '{arg}'; overrides look like --section.key=value")
        if "=" in arg:
            overrides.append(arg[2:])
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            overrides.append(f"{arg[2:]}={args[index + 1]}")
            index += 1
        else:
            raise UserError(f"override '{arg}' has no value; write {arg}=VALUE")
        index += 1
    return overrides


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())
