"""The post-training front doors: :func:`palettize_weights` (coremltools ``optimize.coreml`` style) and
:class:`KMeansPalettizer` (spec style)."""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

from torch import nn

from dkm_palett.config.base import coerce_model_config
from dkm_palett.config.kmeans_palettizer import KMeansPalettizerConfig, ModuleKMeansPalettizerConfig
from dkm_palett.config.palettize_weights import OpPalettizerConfig, OptimizationConfig
from dkm_palett.post_training.jobs import execute, plan_jobs
from dkm_palett.progress import show_progress
from dkm_palett.report import Report
from dkm_palett.validation import check_int, check_type


def as_optimization_config(config: Any) -> OptimizationConfig:
    return coerce_model_config(config, OptimizationConfig, OpPalettizerConfig,
                               "an OptimizationConfig, an OpPalettizerConfig or a dict")


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
    if not inplace:
        model = copy.deepcopy(model)
    report: dict = {}
    jobs = plan_jobs(config.plan(model), report)
    if num_workers is None:
        num_workers = max([p.config.num_kmeans_workers for p, _ in jobs] or [1])
    execute(jobs, report, num_workers, show)
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
        self.config = self._coerce_config(config)
        self._report: dict = {}

    @staticmethod
    def _coerce_config(config: Any) -> Any:
        return _as_kmeans_config(config)

    def _palettize(self, model: nn.Module, num_workers: int, progress: bool,
                   importance: Optional[dict] = None) -> nn.Module:
        """Plan ``model`` (the copy being palettized), cluster every planned weight and attach its record."""
        self._report = {}
        execute(plan_jobs(self.config.plan(model), self._report, importance), self._report, num_workers, progress)
        return model

    # prepare(example_inputs, ...) keeps the peer API's name and signature (coreai_opt's KMeansPalettizer), so code
    # written for it runs unchanged; eager mode needs no example inputs.
    def prepare(self, example_inputs: Any = None, num_workers: int = 1, inplace: bool = False,
                progress: Optional[bool] = None) -> nn.Module:
        """Palettize and return the model; ``num_workers > 1`` clusters weights in spawned worker processes;
        ``progress``: a bar over the weights (``None``: only in interactive sessions)."""
        check_int("num_workers", num_workers, minimum=1)
        show = show_progress(progress)
        return self._palettize(self.model if inplace else copy.deepcopy(self.model), num_workers, show)

    def report(self) -> dict:
        """Per-weight rows (:func:`dkm_palett.report.record_stats` schema) from the last ``prepare``/``compress``."""
        return Report(self._report)
