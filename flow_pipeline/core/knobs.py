"""Knob declarations: a dataclass field that carries its description, bounds and valid values.

A settings dataclass declares each knob once with :func:`knob`; :func:`knobs_of` reads them back as :class:`Knob`
records, from which the layers above derive their validated models, run configs and reference tables. Nothing here
validates: :meth:`KnobInfo.bounds` and ``choices`` say what a validator must enforce.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any

METADATA_KEY = "knob"


@dataclass(frozen=True)
class KnobInfo:
    """What a knob means and which values it takes.

    ge/gt/le/lt: numeric bounds (None: unbounded on that side); choices: the valid values of a named knob (empty:
    any); group: the heading it is listed under.
    """

    description: str
    group: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()

    def bounds(self) -> dict[str, float]:
        """The bounds that are set, by name (``ge``, ``gt``, ``le``, ``lt``)."""
        return {name: value for name in ("ge", "gt", "le", "lt") if (value := getattr(self, name)) is not None}

    def valid_values(self) -> str:
        """The valid values in words: ``one of a, b`` or ``>= 0, < 1``; empty when any value is valid."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        return ", ".join(f"{symbols[name]} {value:g}" for name, value in self.bounds().items())


@dataclass(frozen=True)
class Knob:
    """One declared knob: its field name, resolved type annotation, default and :class:`KnobInfo`."""

    name: str
    annotation: Any
    default: Any
    info: KnobInfo


def knob(default: Any, description: str, *, group: str, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with ``default`` whose metadata is the knob's :class:`KnobInfo`."""
    info = KnobInfo(description=description, group=group, ge=ge, gt=gt, le=le, lt=lt, choices=tuple(choices))
    return dataclasses.field(default=default, metadata={METADATA_KEY: info})


@functools.cache
def knobs_of(settings: type) -> tuple[Knob, ...]:
    """Every field of the dataclass ``settings`` declared with :func:`knob`, in declaration order (read once per
    class: validators ask for them on every value)."""
    hints = typing.get_type_hints(settings)
    return tuple(Knob(name=field.name, annotation=hints[field.name], default=field.default,
                      info=field.metadata[METADATA_KEY])
                 for field in dataclasses.fields(settings) if METADATA_KEY in field.metadata)
