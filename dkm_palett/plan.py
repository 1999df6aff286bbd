"""The planning layer: which weights of a model a config palettizes, and with which spec.

Each front door (``DKMPalettizerConfig``, ``OptimizationConfig``, ``KMeansPalettizerConfig``) has a
``plan(model) -> list[PlannedWeight]`` built on the pieces here: name resolution (:func:`match_name`, exact keys before
full-match regexes), type resolution (:func:`match_type`, the most specific class wins) and the validation of
explicit targets (:func:`check_explicit_targets`). ``DKMPalettizer.prepare``, ``palettize_weights``, both k-means
palettizers and the recipes' layer check consume plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from dkm_palett.module_support import SUPPORTED_PARAMS, is_supported, name_matches, type_name
from dkm_palett.spec import PalettizationSpec


def full_name(module_name: str, param_name: str) -> str:
    """``<module>.<param>``, or the parameter name alone on the root module."""
    return f"{module_name}.{param_name}" if module_name else param_name


@dataclass
class PlannedWeight:
    """One weight a config decides about: where it lives, its spec, and the config entry that chose it.

    A skipped weight has ``spec=None`` and the ``reason`` it is left alone (e.g. its size is at or under
    ``weight_threshold``); ``param_name=None`` stands for a whole module that is skipped (an unsupported type).
    """

    module_name: str
    module: nn.Module
    param_name: Optional[str]
    spec: Optional[PalettizationSpec]
    config: Any = None
    reason: Optional[str] = None

    @property
    def name(self) -> str:
        return self.module_name if self.param_name is None else full_name(self.module_name, self.param_name)

    @property
    def selected(self) -> bool:
        """Whether the weight is palettized (it has a spec)."""
        return self.spec is not None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param_name)


def match_name(table: dict, names: tuple[str, ...]) -> tuple[bool, Any]:
    """``(True, entry)`` for the first key equal to one of ``names``, else for the first key that fully matches one
    of them as a regex; ``(False, None)`` when no key matches."""
    for key, value in table.items():
        if key in names:
            return True, value
    for key, value in table.items():
        if any(name_matches(key, n) for n in names):
            return True, value
    return False, None


def _own_classes(key: type) -> tuple[type, ...]:
    return (key,)


def match_type(table: dict, module: nn.Module,
               classes_of: Callable[[Any], tuple[type, ...]] = _own_classes) -> tuple[bool, Any]:
    """``(True, entry)`` for the key naming the most specific class of ``module`` (``classes_of(key)``: the classes
    a key stands for); ``(False, None)`` when none does."""
    for cls in type(module).__mro__:
        for key, value in table.items():
            if cls in classes_of(key):
                return True, value
    return False, None


def supported_type_names() -> str:
    return ", ".join(c.__name__ for c in SUPPORTED_PARAMS)


def holds_weights(modules: dict[str, nn.Module], scoped: bool) -> dict[str, bool]:
    """For each module name, whether it holds palettizable weights: it is a supported type, or (``scoped``) it or a
    module below it is."""
    holds = {name: is_supported(module) for name, module in modules.items()}
    if scoped:
        for name in [n for n, h in holds.items() if h]:
            while name:
                name = name.rpartition(".")[0]
                holds[name] = True
    return holds


def check_explicit_targets(modules: dict[str, nn.Module], names: tuple[str, dict], types: tuple[str, dict], *,
                           scoped: bool = False, param_names: bool = False, require_match: bool = True,
                           classes_of: Callable[[Any], tuple[type, ...]] = _own_classes) -> None:
    """Raise ValueError for a config that names what cannot be palettized.

    ``names``/``types``: ``(field, table)`` of the name and type keys. A name key that matches nothing fails when
    ``require_match``; a non-None name key whose every match holds no palettizable weights fails; a non-None type key
    fails on a class (``classes_of(key)``) that is not a supported type when no module of it in the model holds
    palettizable weights.
    ``scoped``: a name or type key stands for a module and everything below it. ``param_names``: name keys may also
    name parameters (``<module>.<param>``).
    """
    holds = holds_weights(modules, scoped)
    if param_names:
        holds.update({full_name(n, p): True for n, m in modules.items() for p, _ in m.named_parameters(recurse=False)})
    allowed = supported_type_names()
    field, table = names
    for key, cfg in table.items():
        matches = [n for n in holds if name_matches(key, n)]
        if not matches:
            if require_match:
                raise ValueError(f"{field} key {key!r} matches no module in the model.")
            continue
        if cfg is not None and not any(holds[n] for n in matches):
            raise ValueError(f"{field}[{key!r}] names module {matches[0]!r} ({type(modules[matches[0]]).__name__}), "
                             f"which is not supported and cannot be palettized; supported module types: {allowed}.")
    field, table = types
    for key, cfg in table.items():
        if cfg is None:
            continue
        for cls in classes_of(key):
            if issubclass(cls, tuple(SUPPORTED_PARAMS)):
                continue
            if not any(holds[n] for n, m in modules.items() if isinstance(m, cls)):
                raise ValueError(f"{field} names {type_name(cls)}, which is not supported and cannot be palettized; "
                                 f"supported module types: {allowed}.")
