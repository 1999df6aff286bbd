"""Which modules can be palettized, which of their parameters, and how config keys name module types."""

from __future__ import annotations

import importlib
import re
from typing import Any

from torch import nn

#: Supported module types and the parameters palettized on each. MultiheadAttention's ``out_proj`` is an
#: ``nn.Linear`` submodule and is handled as a Linear.
SUPPORTED_PARAMS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("weight",),
    nn.Conv1d: ("weight",),
    nn.Conv2d: ("weight",),
    nn.Conv3d: ("weight",),
    nn.Embedding: ("weight",),
    nn.LayerNorm: ("weight",),
    nn.MultiheadAttention: ("in_proj_weight",),
}


def supported_params(module: nn.Module) -> tuple[str, ...]:
    """Names of the palettizable parameters of ``module`` (empty when the module type is unsupported)."""
    for cls in type(module).__mro__:
        if cls in SUPPORTED_PARAMS:
            names = SUPPORTED_PARAMS[cls]
            return tuple(n for n in names if isinstance(getattr(module, n, None), nn.Parameter))
    return ()


def is_supported(module: nn.Module) -> bool:
    return any(cls in SUPPORTED_PARAMS for cls in type(module).__mro__)


def type_name(cls: type) -> str:
    """Dotted name of a class, e.g. ``torch.nn.modules.linear.Linear``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_type_key(key: Any) -> type:
    """Turn a module-type config key (a class or a dotted string such as ``'torch.nn.Linear'``) into a class."""
    if isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise TypeError(f"module type key {key!r} is not an nn.Module subclass.")
        return key
    if not isinstance(key, str):
        raise TypeError(f"module type keys must be classes or dotted strings, got {type(key).__name__} ({key!r}).")
    module_path, _, attr = key.rpartition(".")
    if not module_path:
        candidate = getattr(nn, key, None)
        if isinstance(candidate, type) and issubclass(candidate, nn.Module):
            return candidate
        raise ValueError(
            f"module type {key!r} is not a dotted class path; write e.g. 'torch.nn.Linear' or "
            "'torch.nn.modules.conv.Conv2d'."
        )
    try:
        cls = getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError):
        raise ValueError(f"module type {key!r} cannot be imported; write e.g. 'torch.nn.Linear'.") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"module type {key!r} is not an nn.Module subclass.")
    return cls


def name_matches(pattern: str, name: str) -> bool:
    """A module-name key matches exactly, or as a full regular expression."""
    if pattern == name:
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False
