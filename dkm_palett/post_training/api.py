"""The post-training front doors: :func:`palettize_weights` (coremltools ``optimize.coreml`` style) and
:class:`KMeansPalettizer` (spec style)."""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

from torch import nn

from dkm_palett.config.base import coerce_model_config
from dkm_palett.config.kmeans_palettizer import KMeansPalettizerConfig, ModuleKMeansPalettizerConfig
from dkm_palett.config.palettize_weights import COREML_OP_ALIASES, OpPalettizerConfig, OptimizationConfig
from dkm_palett.module_support import SUPPORTED_PARAMS, is_supported, name_matches, supported_params
from dkm_palett.post_training.jobs import (
    PalettizationJob,
    Target,
    execute,
    full_name,
    job_seed,
    seed_base,
    skip_entry,
)
from dkm_palett.progress import show_progress
from dkm_palett.report import Report
from dkm_palett.validation import check_finite, check_int, check_type


def as_optimization_config(config: Any) -> OptimizationConfig:
    return coerce_model_config(config, OptimizationConfig, OpPalettizerConfig,
                               "an OptimizationConfig, an OpPalettizerConfig or a dict")


def _check_coreml_targets(model: nn.Module, config: OptimizationConfig) -> None:
    allowed = ", ".join(c.__name__ for c in SUPPORTED_PARAMS)
    modules = dict(model.named_modules())
    names = list(modules) + [full_name(n, p) for n, m in modules.items() for p, _ in m.named_parameters(recurse=False)]
    for key, cfg in config.op_name_configs.items():
        matches = [n for n in names if name_matches(key, n)]
        if not matches:
            raise ValueError(f"op_name_configs key {key!r} matches no module or parameter in the model.")
        if cfg is not None and all(n in modules and not is_supported(modules[n]) for n in matches):
            raise ValueError(f"op_name_configs[{key!r}] names module {matches[0]!r} "
                             f"({type(modules[matches[0]]).__name__}), which is not supported; "
                             f"supported module types: {allowed}.")
    for key, cfg in config.op_type_configs.items():
        classes = COREML_OP_ALIASES.get(key, (key,)) if isinstance(key, str) else (key,)
        for cls in classes:
            if cfg is not None and not any(issubclass(cls, s) for s in SUPPORTED_PARAMS):
                raise ValueError(f"op_type_configs names {cls.__module__}.{cls.__qualname__}, which is not "
                                 f"supported; supported module types: {allowed}.")


def coreml_targets(model: nn.Module, config: OptimizationConfig, report: dict,
                    importance: Optional[dict] = None) -> tuple[list[Target], int]:
    """Jobs for every weight ``config`` palettizes (skips go straight into ``report``), and the worker count."""
    targets: list[Target] = []
    workers = 1
    for module_name, module in model.named_modules():
        for param_name in supported_params(module):
            name = full_name(module_name, param_name)
            param = getattr(module, param_name)
            cfg = config.resolve(module_name, module, param_name)
            if cfg is None:
                report[name] = skip_entry(module, "no config applies (None)", param.numel())
                continue
            if not cfg.applies_to(param.numel()):
                report[name] = skip_entry(module, f"{param.numel()} elements <= weight_threshold={cfg.weight_threshold}",
                                     param.numel())
                continue
            check_finite(f"{name} ({type(module).__name__})", param)
            spec = cfg.to_spec(n_bits=cfg.nbits if cfg.nbits is not None else 8)
            spec.check_shape(tuple(param.shape), name)
            imp = None if importance is None or cfg.mode != "kmeans" else importance.get(name)
            job = PalettizationJob(name=name, weight=param.detach().cpu().clone(), spec=spec, mode=cfg.mode,
                                   importance=imp, fixed_bits=cfg.nbits is not None)
            targets.append(Target(module_name, module, param_name, job))
            workers = max(workers, cfg.num_kmeans_workers)
    base = seed_base(t.job.spec for t in targets)
    for t in targets:
        t.job.seed = job_seed(base, t.name)
    return targets, workers


def palettize_weights(model: nn.Module, config: Union[OptimizationConfig, OpPalettizerConfig, dict], *,
                      inplace: bool = False, return_report: bool = False, num_workers: Optional[int] = None,
                      progress: Optional[bool] = None):
    """Palettize ``model``'s supported weights after training, without data (coremltools ``palettize_weights``).

    Returns the palettized model (a deep copy unless ``inplace``), or ``(model, report)`` with
    ``return_report=True``: a :class:`~dkm_palett.report.Report` mapping each supported weight's qualified name to
    its row (:func:`~dkm_palett.report.record_stats`: LUT facts, bytes, ``rms_error``; or ``palettized=False`` and
    the ``reason`` it was skipped).
    ``num_workers`` defaults to the largest ``num_kmeans_workers`` in the config. ``progress``: a bar over the
    weights (``None``: only in interactive sessions, see ``dkm_palett.progress``).
    """
    check_type("model", model, nn.Module)
    show = show_progress(progress)
    config = as_optimization_config(config)
    _check_coreml_targets(model, config)
    if not inplace:
        model = copy.deepcopy(model)
    report: dict = {}
    targets, workers = coreml_targets(model, config, report)
    execute(targets, report, num_workers if num_workers is not None else workers, show)
    return (model, Report(report)) if return_report else model


# ----------------------------------------------------------------------------------------- spec style


def _as_kmeans_config(config: Any) -> KMeansPalettizerConfig:
    return coerce_model_config(config, KMeansPalettizerConfig, ModuleKMeansPalettizerConfig,
                               "a KMeansPalettizerConfig, a ModuleKMeansPalettizerConfig, a dict or None",
                               allow_none=True)


class KMeansPalettizer:
    """Spec-style post-training k-means palettization.

    ``prepare()`` returns a palettized copy of the model (every weight the config selects becomes ``LUT[indices]``
    with a record attached). Scalar specs are deterministic; vector specs (``cluster_dim > 1``) draw one seed from
    torch's global RNG at ``prepare`` time, so ``torch.manual_seed(s)`` before ``prepare`` reproduces them, with any
    ``num_workers``.
    """

    def __init__(self, model: nn.Module, config: Union[KMeansPalettizerConfig, ModuleKMeansPalettizerConfig,
                                                        dict, None] = None):
        check_type("model", model, nn.Module)
        self.model = model
        self.config = _as_kmeans_config(config)
        self._report: dict = {}
        self._prepared: Optional[nn.Module] = None

    def _targets(self, model: nn.Module, importance: Optional[dict] = None) -> list[Target]:
        planned = self.config.plan(model)
        targets = []
        for p in planned:
            param = getattr(p.module, p.param_name)
            check_finite(f"{p.name} ({type(p.module).__name__})", param)
            imp = None if importance is None else importance.get(p.name)
            job = PalettizationJob(name=p.name, weight=param.detach().cpu().clone(), spec=p.spec, importance=imp)
            targets.append(Target(p.module_name, p.module, p.param_name, job))
        base = seed_base(t.job.spec for t in targets)
        for t in targets:
            t.job.seed = job_seed(base, t.name)
        return targets

    # prepare(example_inputs, ...) and finalize() keep the peer API's names and signatures (coreai_opt / coremltools
    # KMeansPalettizer), so code written for it runs unchanged: eager mode needs no example inputs, and the weights
    # are final after prepare.
    def prepare(self, example_inputs: Any = None, num_workers: int = 1, inplace: bool = False,
                progress: Optional[bool] = None) -> nn.Module:
        """Palettize and return the model; ``num_workers > 1`` clusters weights in spawned worker processes;
        ``progress``: a bar over the weights (``None``: only in interactive sessions)."""
        check_int("num_workers", num_workers, minimum=1)
        show = show_progress(progress)
        model = self.model if inplace else copy.deepcopy(self.model)
        self._report = {}
        execute(self._targets(model), self._report, num_workers, show)
        self._prepared = model
        return model

    def finalize(self, model: Optional[nn.Module] = None, inplace: bool = False) -> nn.Module:
        """Nothing left to do after ``prepare`` (weights are already LUT[indices]); returns the prepared model."""
        model = model if model is not None else self._prepared
        if model is None:
            raise RuntimeError("call prepare() before finalize().")
        return model

    def report(self) -> dict:
        """Per-weight rows (:func:`dkm_palett.report.record_stats` schema) from the last ``prepare``/``compress``."""
        return Report(self._report)
