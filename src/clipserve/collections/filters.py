"""Metadata filters: a small JSON query language turned into a parameterised SQLite WHERE clause.

    {"camera": "x100"}                       equality (also {"camera": {"$eq": "x100"}})
    {"tag": {"$in": ["cat", "dog"]}}         membership
    {"year": {"$gte": 2020, "$lt": 2024}}    ranges ($gt, $gte, $lt, $lte), $ne
    {"exif.iso": 100}                        dotted paths reach into nested objects
    {"label": null}                          the field is absent or null

All conditions are ANDed. Field paths and values are bound as SQL parameters (`json_extract(metadata, ?)`),
so no user text is ever spliced into SQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_FIELD = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_COMPARISONS = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_SCALARS = (str, int, float, bool)


class FilterError(ValueError):
    """A metadata filter that is not valid; the message names the offending field or operator."""


def _json_path(field: str) -> str:
    if not isinstance(field, str) or not _FIELD.match(field):
        raise FilterError(f"filter field {field!r}: use letters, digits, '_', '-' and '.' for nesting")
    return "$." + ".".join(f'"{part}"' for part in field.split("."))


def _scalar(field: str, op: str, value: Any) -> Any:
    if not isinstance(value, _SCALARS):
        raise FilterError(f"filter field {field!r}: {op} needs a string, number or boolean, got {value!r}")
    return value


def compile_filter(spec: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
    """(SQL condition on table `items`, parameters); `("1", [])` when there is no filter."""
    if not spec:
        return "1", []
    if not isinstance(spec, Mapping):
        raise FilterError(f"a filter is a JSON object of field conditions, got {type(spec).__name__}")
    clauses: list[str] = []
    params: list[Any] = []
    for field, condition in spec.items():
        path = _json_path(field)
        column = "json_extract(metadata, ?)"
        if condition is None:
            clauses.append(f"{column} IS NULL")
            params.append(path)
            continue
        if not isinstance(condition, Mapping):
            condition = {"$eq": condition}
        if not condition:
            raise FilterError(f"filter field {field!r}: empty condition")
        for op, value in condition.items():
            if op == "$in":
                if not isinstance(value, list) or not value:
                    raise FilterError(f"filter field {field!r}: $in needs a non-empty list")
                values = [_scalar(field, op, v) for v in value]
                clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
                params.extend([path, *values])
            elif op in _COMPARISONS:
                clauses.append(f"{column} {_COMPARISONS[op]} ?")
                params.extend([path, _scalar(field, op, value)])
            else:
                known = ", ".join(["$in", *_COMPARISONS])
                raise FilterError(f"filter field {field!r}: unknown operator {op!r} (known: {known})")
    return " AND ".join(clauses), params
