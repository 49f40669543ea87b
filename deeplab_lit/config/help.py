"""`--help` for every config key, generated from the schema: type, default and one line of doc."""
from __future__ import annotations

import dataclasses
import typing

from deeplab_lit.config.schema import SECTIONS, Config, key_role, plain

_TRAINER_KEYS_SHOWN = ("max_steps", "val_check_interval", "devices", "num_nodes", "strategy", "accelerator",
                       "precision", "accumulate_grad_batches", "limit_val_batches", "enable_progress_bar")


def type_name(hint) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Union and type(None) in args:
        return type_name(next(a for a in args if a is not type(None))) + "?"
    if origin in (tuple, list):
        return f"[{type_name(args[0])}, ...]" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _choices(field) -> str:
    source = field.metadata.get("choices")
    if not source:
        return ""
    from deeplab_lit.models import BACKBONES, GENERATIONS, HEADS
    from datamodules import DATAMODULES

    registry = {"models.BACKBONES": BACKBONES, "models.HEADS": HEADS, "models.GENERATIONS": GENERATIONS,
                "datamodules.DATAMODULES": DATAMODULES}[source]
    return "|".join(registry.choices())


def key_rows() -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, role, doc) of every config key, in schema order."""
    rows = []
    defaults = plain(Config())
    for top in dataclasses.fields(Config):
        section = SECTIONS.get(top.name)
        hints = typing.get_type_hints(section) if section else typing.get_type_hints(Config)
        if section is None and top.name != "trainer":
            rows.append((top.name, type_name(hints[top.name]), repr(defaults[top.name]), key_role(top.name),
                         top.metadata.get("doc", "")))
            continue
        if top.name == "trainer":
            for name in _TRAINER_KEYS_SHOWN:
                rows.append((f"trainer.{name}", "", "", key_role(f"trainer.{name}"),
                             "lightning.Trainer argument (every other one is accepted too)"))
            continue
        for f in dataclasses.fields(section):
            kind = _choices(f) or type_name(hints[f.name])
            dotted = f"{top.name}.{f.name}"
            rows.append((dotted, kind, repr(defaults[top.name][f.name]), key_role(dotted), f.metadata.get("doc", "")))
    return rows


def render_help() -> str:
    lines = ["config keys (--key=value; values are read as YAML):", ""]
    width = max(len(row[0]) for row in key_rows()) + 2
    for key, kind, default, role, doc in key_rows():
        default_text = f" (default {default})" if default else ""
        lines.append(f"  --{key:<{width}}{kind}{default_text}")
        lines.append(f"  {'':<{width + 2}}{doc} [{role}]")
    lines.append("")
    lines.append("roles: run = changes what is trained; evaluation = only how it is evaluated (evaluate accepts "
                 "these); infrastructure = where and how fast, never the numbers.")
    return "\n".join(lines) + "\n"
