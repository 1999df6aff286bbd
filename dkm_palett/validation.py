"""Small checks that turn bad input into a clear ValueError/TypeError naming the field and what is allowed."""

from __future__ import annotations

import difflib
from typing import Any, Iterable


def check_keys(where: str, data: dict, allowed: Iterable[str]) -> None:
    """Raise ValueError naming every unknown key (with a close-match hint)."""
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a dict, got {type(data).__name__}.")
    allowed = sorted(allowed)
    unknown = [k for k in data if k not in allowed]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{where}: unknown key(s) {', '.join(hints)}. Allowed keys: {', '.join(allowed)}.")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}.")
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}.")


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise TypeError(f"{name} must be {names}, got {type(value).__name__} ({value!r}).")


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} must be <= {maximum}.")


def check_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                 strict_min: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r}).")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={value} must be finite.")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        raise ValueError(f"{name}={value} must be {'>' if strict_min else '>='} {minimum}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} must be <= {maximum}.")


def check_finite(name: str, tensor) -> None:
    """Raise ValueError if a weight holds NaN or Inf."""
    import torch

    # the sum is finite when every value is (unless values near float max overflow it: then check each value);
    # a scalar, where isfinite(tensor).all() allocates a mask as large as the weight on every training step
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(
            f"{name} holds {bad} NaN/Inf value(s); palettization needs finite weights. "
            "Check the training run (learning rate, loss scaling) or the checkpoint that produced them."
        )
