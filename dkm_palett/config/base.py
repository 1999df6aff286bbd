"""Dict/YAML round trip shared by the config dataclasses."""

from __future__ import annotations

import dataclasses
import os
from typing import IO, Any, Union

import torch
import yaml

from dkm_palett.spec import LUT_DTYPE_TABLE
from dkm_palett.validation import check_keys

_TORCH_DTYPES = {str(d): d for d in (torch.qint8, torch.quint8, *(row.torch_dtype for row in LUT_DTYPE_TABLE.values()))}


def to_plain(value: Any) -> Any:
    """Convert a field value to YAML-friendly primitives (torch dtypes become strings, tuples lists)."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def from_plain(value: Any) -> Any:
    if isinstance(value, str) and value in _TORCH_DTYPES:
        return _TORCH_DTYPES[value]
    return value


def coerce_entry(value: Any, cls: type, where: str, alternatives: str = "a dict or None") -> Any:
    """A config entry: ``None``, a ``cls`` instance, or a dict for ``cls.from_dict`` (its errors name ``where``)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        try:
            return cls.from_dict(value)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{where}: {err}") from None
    article = "an" if cls.__name__[0] in "AEIOU" else "a"
    raise TypeError(f"{where} must be {article} {cls.__name__}, {alternatives}; got {type(value).__name__}.")


def coerce_model_config(value: Any, model_cls: type, module_cls: type, accepted: str, *,
                        allow_none: bool = False, allow_yaml: bool = False) -> Any:
    """The one coercion of a front door's ``config`` argument into ``model_cls``: an instance as is, a module-level
    ``module_cls`` as its global config, a dict via ``from_dict``, optionally None (defaults) and a YAML path or
    stream. Anything else raises a TypeError that lists ``accepted``."""
    if value is None and allow_none:
        return model_cls()
    if isinstance(value, model_cls):
        return value
    if isinstance(value, module_cls):
        return model_cls(global_config=value)
    if isinstance(value, dict):
        return model_cls.from_dict(value)
    if allow_yaml and (hasattr(value, "read") or isinstance(value, str) or hasattr(value, "__fspath__")):
        return model_cls.from_dict(load_yaml_mapping(value))
    raise TypeError(f"config must be {accepted}; got {type(value).__name__}.")


def load_yaml_mapping(yml: Union[IO, str, os.PathLike]) -> dict:
    """Read a YAML mapping from a stream, a path, or a YAML string."""
    if hasattr(yml, "read"):
        data = yaml.safe_load(yml)
    else:
        text = os.fspath(yml)
        if os.path.exists(text):
            with open(text, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        elif "\n" in text or ":" in text:
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"config file {text!r} does not exist.")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TypeError(f"a config YAML must hold a mapping, got {type(data).__name__}.")
    return data


class ConfigIO:
    """Mixin: ``as_dict``, ``from_dict`` (unknown keys named), ``from_yaml``, ``to_yaml`` for flat dataclasses."""

    def as_dict(self) -> dict:
        return {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict):
        check_keys(cls.__name__, data, (f.name for f in dataclasses.fields(cls)))
        return cls(**{k: from_plain(v) for k, v in data.items()})

    @classmethod
    def from_yaml(cls, yml: Union[IO, str, os.PathLike]):
        return cls.from_dict(load_yaml_mapping(yml))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)
