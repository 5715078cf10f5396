"""Validation of user input, in one place. Each check raises a specific error."""

from __future__ import annotations

from collections.abc import Iterable

from gradprobe.errors import BudgetError, InputError


def parse_frames(spec: str | Iterable[int]) -> list[int]:
    """Parse a frame grid such as ``"8,16,32,64"`` into sorted unique positive ints.

    Raises:
        BudgetError: if an entry is not a positive integer or the grid is empty.
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if not any(parts):
            raise BudgetError("frames: empty frame grid; give positive integers such as 8,16,32,64")
        values = []
        for p in parts:
            if not p:
                raise BudgetError(f"frames: empty entry in {spec!r}")
            try:
                v = int(p)
            except ValueError:
                raise BudgetError(f"frames: {p!r} is not a positive integer") from None
            values.append(v)
    else:
        values = list(spec)
    return check_frames(values)


def check_frames(values: Iterable[object]) -> list[int]:
    """Check that every budget is a positive int; return them sorted and unique."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise BudgetError(f"frames: {v!r} is not a positive integer")
        v = int(v)
        if v <= 0:
            raise BudgetError(f"frames: {v} is not a positive integer")
        out.append(v)
    if not out:
        raise BudgetError("frames: empty frame grid")
    if len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1})
        raise BudgetError(f"frames: budget {dup[0]} is given twice")
    return sorted(out)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value

