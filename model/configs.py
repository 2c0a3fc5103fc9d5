"""Strict construction of the networks' config dataclasses (the model layer's own, Ray-free)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], d: dict[str, Any], label: str | None = None) -> T:
    """``cls(**d)``, but a key that is not a field is a ValueError naming it and the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {label or cls.__name__} keys: {', '.join(unknown)} "
                         f"(valid: {', '.join(sorted(names))})")
    return cls(**d)
