"""Config values as YAML gives them, matched to the types a dataclass field or a part's constructor
annotates: the one reading of ``1e-3`` (a string in YAML 1.1), of lists as tuples, of null in a union."""

from __future__ import annotations

import types
import typing
from typing import Any


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(matches, converted value) for the few types configs use."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, v = coerce(value, arg)
                if ok:
                    return True, v
        return False, value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            conv = [coerce(v, a) for v, a in zip(value, args, strict=True)]
            return all(ok for ok, _ in conv), tuple(v for _, v in conv)
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return True, value


def type_name(tp: Any) -> str:
    """``int``, ``float | None``...: a type as an error message names it."""
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")
