"""Typed config sections: frozen, keyword-only dataclasses whose fields carry their default, a one-line doc and the
range they accept, checked once when a section is built (``llama_jax.experiment`` puts them together).

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Checkpoint(Section):
        key: ClassVar[str] = "checkpoint"
        every: int = option(1000, "steps between checkpoints", at_least(1))

    Checkpoint(every=0)        # ConfigError: config key checkpoint.every = 0: expected an integer >= 1

A section reads like the dict it replaced (``section["every"]``, ``dict(section)``), so code that took a dict
section takes a typed one.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

from llama_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Check:
    """What a field accepts: ``test`` on a value of ``kind`` (an int is a float here; a bool is neither)."""

    kind: type
    test: Callable[[Any], bool]
    expected: str  # in words, after "expected": "an integer >= 1"

    def accepts(self, value: Any) -> bool:
        if self.kind in (int, float):
            kinds = int if self.kind is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                return False
        elif not isinstance(value, self.kind):
            return False
        return bool(self.test(value))


def at_least(low: int) -> Check:
    return Check(int, lambda v: v >= low, f"an integer >= {low}")


def number(test: Callable[[float], bool], expected: str) -> Check:
    return Check(float, test, f"a number {expected}")


BOOLEAN = Check(bool, lambda v: True, "true or false")


def one_of(*choices: str) -> Check:
    return Check(str, lambda v: v in choices, f"one of {list(choices)}")


def option(default: Any = dataclasses.MISSING, doc: str = "", check: Check | None = None, *,
           factory: Callable[[], Any] | None = None) -> Any:
    """A field with its default (or ``factory``), its doc and its check."""
    metadata = {"doc": doc, "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Section(Mapping):
    """Base of a config section; ``key`` is its dotted place in the experiment config (error messages, help)."""

    key: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if check is not None and not check.accepts(value):
                raise ConfigError(f"config key {self._dotted(f.name)} = {value!r}: expected {check.expected}")

    @classmethod
    def _dotted(cls, name: str) -> str:
        return f"{cls.key}.{name}" if cls.key else name

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any):
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (sections as dicts, tuples as lists): the ``ml_collections`` override surface and JSON."""
        return {name: _plain(getattr(self, name)) for name in self._names()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """The section of ``values`` (a dict, a ConfigDict or a section): unknown keys and bad values name the key;
        nested sections from nested dicts, lists as tuples."""
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
        unknown = sorted(set(values) - set(cls._names()))
        if unknown:
            where = f"config section {cls.key}" if cls.key else "the config"
            raise ConfigError(f"{where} has unknown key(s) {unknown}; known: {list(cls._names())}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            section = _section_type(hints[name])
            if section is not None and isinstance(value, Mapping):
                values[name] = section.from_dict(value)
            elif isinstance(value, list):
                values[name] = tuple(value)
        return cls(**values)

    @classmethod
    def describe(cls, values: Mapping[str, Any] | None = None) -> list[tuple[str, Any, str, str]]:
        """``(dotted key, value, doc, range)`` for every leaf, with ``values``' values (default: the defaults)."""
        rows = []
        for f in dataclasses.fields(cls):
            value = (values or {}).get(f.name, _default(f))
            section = _section_type(typing.get_type_hints(cls)[f.name])
            if section is not None and value is not None:
                inner = (section.describe(value) if issubclass(section, Section)  # a model config: values only
                         else [(k, _plain(v), "", "") for k, v in _plain(value).items()])
                rows += [(f"{f.name}.{k}", v, d, r) for k, v, d, r in inner]
                continue
            check = f.metadata.get("check")
            rows.append((f.name, _plain(value), f.metadata.get("doc", ""), check.expected if check else ""))
        return rows


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _section_type(hint: Any) -> type | None:
    """The section (or other ``from_dict`` class) a field holds, through ``X | None``."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
    return next((c for c in candidates if isinstance(c, type) and hasattr(c, "from_dict")), None)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
