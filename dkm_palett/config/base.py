"""What the configs share: the dict/YAML round trip of flat dataclasses (``ConfigIO``), entry and table coercion, and
``ModelConfig``, the base of the three model-wide front doors (setters, round trip, the ``plan`` contract)."""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from typing import IO, Any, Callable, ClassVar, Union

import torch
import yaml
from torch import nn

from dkm_palett.io import atomic_write_text
from dkm_palett.module_support import resolve_type_key, type_name
from dkm_palett.plan import PlannedWeight, check_explicit_targets, match_name, match_type
from dkm_palett.spec import LUT_DTYPE_TABLE
from dkm_palett.validation import check_keys, check_type

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


# ----------------------------------------------------------------------------------------- keyed tables

def name_key(key: Any, field: str) -> str:
    """A module-name key: a string (an int, as YAML reads ``0:``, becomes its string)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    check_type(f"{field} key", key, str)
    return key


def name_table(value: Any, field: str, entry: Callable[[Any, str], Any]) -> dict:
    """A ``{name: entry}`` table (``None`` = empty); each entry coerced by ``entry(value, where)``."""
    value = {} if value is None else value
    check_type(field, value, dict)
    return {name_key(k, field): entry(v, f"{field}[{k!r}]") for k, v in value.items()}


def type_table(value: Any, field: str, key: Callable[[Any], Any], entry: Callable[[Any, str], Any]) -> dict:
    """A ``{type: entry}`` table (``None`` = empty): keys resolved by ``key``, entries coerced by ``entry``."""
    value = {} if value is None else value
    check_type(field, value, dict)
    return {key(k): entry(v, f"{field}[{k!r}]") for k, v in value.items()}


def type_key_name(key: Any) -> str:
    """How a type key is written out: its string as is (an alias), a class by its dotted name."""
    return key if isinstance(key, str) else type_name(key)


def plain_entry(value: Any) -> Any:
    """A table entry as plain data: ``None``, one config's dict, or a list of them."""
    if isinstance(value, list):
        return [v.as_dict() for v in value]
    return None if value is None else value.as_dict()


class ModelConfig(ABC):
    """Base of the model-wide configs: a ``global_config``, a table by module type (``types_field``) and a table by
    module name (``names_field``: exact names or full-match regexes); each entry an ``entry_class`` or ``None``
    (leave the matched weights alone).

    Subclasses are dataclasses with those three fields whose ``__post_init__`` calls :meth:`_normalize`. This class
    carries the chainable setters (coremltools names), ``as_dict``/``from_dict``/``from_yaml``/``to_yaml`` and
    ``plan(model)``, the weights the config palettizes (:class:`~dkm_palett.plan.PlannedWeight`).
    """

    entry_class: ClassVar[type]
    types_field: ClassVar[str] = "module_type_configs"
    names_field: ClassVar[str] = "module_name_configs"

    # ------------------------------------------------------------------------------- keys and entries
    def _entry(self, value: Any, where: str, in_type_table: bool = False) -> Any:
        """One table entry: ``None``, an ``entry_class`` or a dict for it (subclasses may accept more)."""
        return coerce_entry(value, self.entry_class, where)

    @staticmethod
    def _type_key(key: Any) -> Any:
        return resolve_type_key(key)

    @staticmethod
    def key_classes(key: Any) -> tuple[type, ...]:
        """The module classes a type key stands for."""
        return (key,)

    @property
    def type_configs(self) -> dict:
        return getattr(self, self.types_field)

    @property
    def name_configs(self) -> dict:
        return getattr(self, self.names_field)

    def _normalize(self) -> None:
        self.global_config = self._entry(self.global_config, "global_config")
        setattr(self, self.types_field, type_table(getattr(self, self.types_field), self.types_field, self._type_key,
                                                   lambda v, where: self._entry(v, where, in_type_table=True)))
        setattr(self, self.names_field, name_table(getattr(self, self.names_field), self.names_field, self._entry))

    # ------------------------------------------------------------------------------- chainable setters
    def set_global(self, config: Any):
        self.global_config = self._entry(config, "global_config")
        return self

    def set_module_type(self, module_type: Any, config: Any):
        self.type_configs[self._type_key(module_type)] = self._entry(
            config, f"{self.types_field}[{module_type!r}]", in_type_table=True)
        return self

    def set_module_name(self, module_name: str, config: Any):
        self.name_configs[name_key(module_name, self.names_field)] = self._entry(
            config, f"{self.names_field}[{module_name!r}]")
        return self

    # ------------------------------------------------------------------------------- dict / YAML
    def as_dict(self) -> dict:
        return {
            "global_config": plain_entry(self.global_config),
            self.types_field: {type_key_name(k): plain_entry(v) for k, v in self.type_configs.items()},
            self.names_field: {k: plain_entry(v) for k, v in self.name_configs.items()},
        }

    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        """The bare mapping inside a YAML document (subclasses strip their wrapper)."""
        return data

    def _wrap(self, data: dict) -> dict:
        """The YAML document for ``as_dict()`` (subclasses add their wrapper)."""
        return data

    @classmethod
    def from_dict(cls, data: dict):
        data = cls._unwrap(data)
        check_keys(cls.__name__, data, (f.name for f in dataclasses.fields(cls)))
        return cls(**data)

    @classmethod
    def from_yaml(cls, yml: Union[IO, str, os.PathLike]):
        return cls.from_dict(load_yaml_mapping(yml))

    def to_yaml(self, path: Union[str, os.PathLike, None] = None) -> str:
        """The config as YAML; also written (atomically) to ``path`` when given."""
        text = yaml.safe_dump(self._wrap(self.as_dict()), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    # ------------------------------------------------------------------------------- planning
    def _match(self, names: tuple[str, ...], module: nn.Module) -> tuple[bool, Any]:
        """The entry for a module: by name (``names``, exact before regex), else by its most specific type."""
        found, entry = match_name(self.name_configs, names)
        if not found:
            found, entry = match_type(self.type_configs, module, self.key_classes)
        return found, entry

    def _check_targets(self, modules: dict[str, nn.Module], **rules: bool) -> None:
        """:func:`~dkm_palett.plan.check_explicit_targets` on this config's tables."""
        check_explicit_targets(modules, (self.names_field, self.name_configs), (self.types_field, self.type_configs),
                               classes_of=self.key_classes, **rules)

    @abstractmethod
    def plan(self, model: nn.Module) -> list[PlannedWeight]:
        """Every weight of ``model`` this config decides about: the selected ones with their spec, the skipped
        ones with their reason. Raises ValueError on config mistakes, naming the key or weight."""
