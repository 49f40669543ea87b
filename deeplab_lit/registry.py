"""One registry mechanism: a name -> builder mapping with a one-line description per entry.

Backbones, heads, generations, datasets and LightningModules are registries; the config's allowed
values (and `--help`) come from them, so a new backbone, head or dataset is one file plus one
`register` line. A registry may also take a prefix family (`timm:<name>`), whose names are checked
by the family's own validator.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, Mapping, TypeVar

from deeplab_lit.errors import UserError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    def __init__(self, key: str):
        self.key = key  # the config key whose values name entries, e.g. "model.backbone"
        self._entries: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._families: dict[str, tuple[Callable[[str], T], str]] = {}

    def register(self, name: str, entry: T, doc: str = "") -> T:
        if name in self._entries:
            raise ValueError(f"{self.key}: '{name}' is registered twice")
        self._entries[name] = entry
        self._docs[name] = doc
        return entry

    def register_family(self, prefix: str, factory: Callable[[str], T], doc: str = "") -> None:
        """Names `prefix + anything` resolve through `factory(rest)` (e.g. "timm:" for any timm model)."""
        self._families[prefix] = (factory, doc)

    def family(self, name: str) -> str | None:
        return next((prefix for prefix in self._families if name.startswith(prefix)), None)

    def choices(self) -> list[str]:
        """Registered names, then each family as `prefix<name>` (for messages and --help)."""
        return [*self._entries, *(f"{prefix}<name>" for prefix in self._families)]

    def describe(self) -> dict[str, str]:
        return {**self._docs, **{f"{prefix}<name>": doc for prefix, (_, doc) in self._families.items()}}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or self.family(name) is not None)

    def __getitem__(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        prefix = self.family(name) if isinstance(name, str) else None
        if prefix is not None:
            return self._families[prefix][0](name[len(prefix):])
        hint = difflib.get_close_matches(str(name), list(self._entries), n=1)
        raise UserError(
            f'{self.key}={name!r} is unknown (config key "{self.key}": expected one of [{", ".join(self.choices())}])'
            + (f"; did you mean '{hint[0]}'?" if hint else ""))

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
