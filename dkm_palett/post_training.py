"""Post-training (data-free) and sensitivity-weighted (data-aware) palettization of PyTorch modules.

* :func:`palettize_weights` -- coremltools ``optimize.coreml`` style (``OptimizationConfig`` of ``OpPalettizerConfig``).
* :class:`KMeansPalettizer` -- spec-style (``KMeansPalettizerConfig``), ``prepare(example_inputs, num_workers)``.
* :class:`SensitiveKMeansPalettizer` -- k-means weighted by a Fisher diagonal from calibration batches.

Scalar LUTs (``cluster_dim=1``) are globally optimal weighted 1-D k-means at every tensor size
(:func:`kmeans.kmeans_1d_exact`); vector LUTs use k-means++ with restarts.

All three attach a :class:`~dkm_palett.lut.PalettizedTensor` per weight (``lut.attach``), so their output has the
same form as a DKM-finalized model and the same export paths apply.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from dkm_palett import kmeans as _km
from dkm_palett.config.coreml_style import COREML_OP_ALIASES, OpPalettizerConfig, OptimizationConfig
from dkm_palett.config.spec_style import KMeansPalettizerConfig, ModuleKMeansPalettizerConfig
from dkm_palett.lut import (
    PalettizedTensor,
    attach,
    broadcast_scale,
    channel_scale,
    palettize_with_lut,
    to_grouped_vectors,
)
from dkm_palett.module_support import SUPPORTED_PARAMS, is_supported, name_matches, supported_params
from dkm_palett.spec import ALLOWED_N_BITS, PalettizationSpec
from dkm_palett.validation import check_finite, check_int, check_number, check_type

__all__ = [
    "palettize_weights",
    "cluster_weight",
    "KMeansPalettizer",
    "SensitiveKMeansPalettizer",
    "PalettizationJob",
]

MAX_UNIQUE = 256
VECTOR_N_INIT = 4
VECTOR_MAX_ITER = 50


# ----------------------------------------------------------------------------------------- 1-D k-means


def kmeans_1d(values: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted 1-D k-means, exact at every size (``kmeans.kmeans_1d_exact``); all-zero weights count as
    uniform. Returns ``k`` sorted float32 centroids."""
    values = values.detach().reshape(-1)
    if weights is not None:
        weights = weights.detach().reshape(-1)
        if values.numel() and not bool((weights > 0).any()):
            weights = None
    return _km.kmeans_1d_exact(values, k, weights)


# ----------------------------------------------------------------------------------------- one weight


@dataclass
class PalettizationJob:
    """One weight to cluster; picklable so it can run in a worker process."""

    name: str
    weight: torch.Tensor
    spec: PalettizationSpec
    mode: str = "kmeans"  # kmeans | uniform | unique
    importance: Optional[torch.Tensor] = None
    seed: int = 0
    fixed_bits: bool = True  # unique mode: False = pick the smallest width that holds the distinct values


def cluster_weight(weight: torch.Tensor, spec: PalettizationSpec, *, mode: str = "kmeans",
                   importance: Optional[torch.Tensor] = None, seed: int = 0, name: str = "weight",
                   fixed_bits: bool = True) -> tuple[Optional[PalettizedTensor], Optional[str]]:
    """Cluster ``weight`` per LUT group as ``spec`` says. Returns ``(record, None)``, or ``(None, reason)`` when
    ``mode='unique'`` finds too many distinct values. ``importance`` (same shape as ``weight``, >= 0) weights the
    squared error of each element (scaled by the per-channel scale squared when that is enabled)."""
    check_finite(name, weight)
    spec.check_shape(tuple(weight.shape), name)
    w = weight.detach().float().cpu()
    shape, axis, dim = tuple(w.shape), spec.axis, spec.cluster_dim
    group_size = spec.group_size_for(shape)
    scale = channel_scale(w, axis) if spec.enable_per_channel_scale else None
    scaled = w if scale is None else w / broadcast_scale(scale, shape, axis)
    vectors = to_grouped_vectors(scaled, axis, group_size, dim)  # (G, M, D)
    imp = None
    if importance is not None:
        if tuple(importance.shape) != shape:
            raise ValueError(f"{name}: importance has shape {tuple(importance.shape)}, expected {shape}.")
        imp_t = importance.detach().float().cpu().clamp(min=0)
        if scale is not None:
            imp_t = imp_t * broadcast_scale(scale, shape, axis) ** 2
        imp = to_grouped_vectors(imp_t, axis, group_size, dim).sum(-1)  # (G, M)

    if mode == "unique":
        uniques = [torch.unique(vectors[g], dim=0) for g in range(vectors.shape[0])]
        most = max(u.shape[0] for u in uniques)
        if most > MAX_UNIQUE:
            return None, f"mode='unique': {most} distinct values (more than {MAX_UNIQUE}); left as is."
        if fixed_bits:
            if most > spec.n_clusters:
                return None, (f"mode='unique': {most} distinct values do not fit nbits={spec.n_bits}; left as is.")
        else:
            spec = dataclasses.replace(spec, n_bits=next(b for b in ALLOWED_N_BITS if 2 ** b >= most))
        lut = torch.stack([_pad_rows(u, spec.n_clusters) for u in uniques])
        return palettize_with_lut(weight, lut, spec, scale), None

    k = spec.n_clusters
    generator = torch.Generator().manual_seed(int(seed))
    luts = []
    for g in range(vectors.shape[0]):
        v = vectors[g]
        wg = None if imp is None else imp[g]
        if mode == "uniform":
            lo, hi = v.min().item(), v.max().item()
            luts.append(torch.linspace(lo, hi, k).reshape(k, 1))
        elif dim == 1:
            luts.append(kmeans_1d(v[:, 0], k, wg).reshape(k, 1))
        else:
            luts.append(_vector_kmeans(v, k, wg, generator))
    lut = torch.stack(luts).float()
    return palettize_with_lut(weight, lut, spec, scale), None


def _pad_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    reps = torch.arange(k) % rows.shape[0]
    return rows[reps].float()


def _vector_kmeans(v: torch.Tensor, k: int, weights: Optional[torch.Tensor], generator: torch.Generator):
    """k-means++ seeding with restarts + Lloyd for ``cluster_dim > 1`` (``kmeans.kmeans_plus_plus``)."""
    uniq = torch.unique(v, dim=0)
    if uniq.shape[0] <= k:
        return _pad_rows(uniq, k)
    return _km.kmeans_plus_plus(v, k, weights, n_init=VECTOR_N_INIT, max_iter=VECTOR_MAX_ITER,
                                generator=generator).float()


def _run_job(job: PalettizationJob) -> tuple[Optional[PalettizedTensor], Optional[str]]:
    return cluster_weight(job.weight, job.spec, mode=job.mode, importance=job.importance, seed=job.seed,
                          name=job.name, fixed_bits=job.fixed_bits)


def _worker_init() -> None:
    torch.set_num_threads(1)


JobResult = tuple[Optional[PalettizedTensor], Optional[str]]


def run_jobs(jobs: list[PalettizationJob], num_workers: int = 1) -> list[JobResult]:
    """Cluster every job, in ``num_workers`` spawned processes when > 1 (same results as sequential: each job
    carries its own seed). Scripts using workers need the usual ``if __name__ == '__main__':`` guard."""
    check_int("num_workers", num_workers, minimum=1)
    if num_workers == 1 or len(jobs) < 2:
        return [_run_job(job) for job in jobs]
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(num_workers, len(jobs)), mp_context=ctx,
                             initializer=_worker_init) as pool:
        return list(pool.map(_run_job, jobs))


def _seed_base(specs: Iterable[PalettizationSpec]) -> int:
    """A seed drawn from torch's global RNG, only when some spec needs randomness (vector k-means)."""
    if any(s.cluster_dim > 1 for s in specs):
        return int(torch.randint(0, 2 ** 62, (1,)).item())
    return 0


def _job_seed(base: int, name: str) -> int:
    return (base + zlib.crc32(name.encode())) % (2 ** 63)


def _entry(record: PalettizedTensor, original: torch.Tensor, mode: str, module: nn.Module) -> dict:
    dense = record.to_dense().float()
    orig = original.detach().float().cpu()
    original_bits = record.numel * torch.finfo(record.dtype).bits
    bits = record.storage_bits()
    return {
        "status": "palettized", "module_type": type(module).__name__, "mode": mode, "shape": list(record.shape),
        "numel": record.numel, "n_bits": record.n_bits, "n_luts": record.n_groups, "cluster_dim": record.cluster_dim,
        "lut_dtype": record.lut_dtype, "per_channel_scale": record.scale is not None,
        "mse": float(((dense - orig) ** 2).mean()), "storage_bits": bits,
        "compression_ratio": original_bits / bits,
    }


def _skip(module: nn.Module, reason: str, numel: int) -> dict:
    return {"status": "skipped", "module_type": type(module).__name__, "numel": numel, "reason": reason}


@dataclass
class _Target:
    module_name: str
    module: nn.Module
    param_name: str
    job: PalettizationJob

    @property
    def name(self) -> str:
        return self.job.name


def _execute(targets: list[_Target], report: dict, num_workers: int) -> None:
    results = run_jobs([t.job for t in targets], num_workers)
    for target, (record, note) in zip(targets, results):
        param = getattr(target.module, target.param_name)
        if record is None:
            report[target.name] = _skip(target.module, note, param.numel())
            continue
        original = param.detach().clone()
        attach(target.module, target.param_name, record)
        report[target.name] = _entry(record, original, target.job.mode, target.module)


def _full(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


# ----------------------------------------------------------------------------------------- coremltools style


def _as_optimization_config(config: Any) -> OptimizationConfig:
    if isinstance(config, OptimizationConfig):
        return config
    if isinstance(config, OpPalettizerConfig):
        return OptimizationConfig(global_config=config)
    if isinstance(config, dict):
        return OptimizationConfig.from_dict(config)
    raise TypeError("config must be an OptimizationConfig, an OpPalettizerConfig or a dict; "
                    f"got {type(config).__name__}.")


def _check_coreml_targets(model: nn.Module, config: OptimizationConfig) -> None:
    allowed = ", ".join(c.__name__ for c in SUPPORTED_PARAMS)
    modules = dict(model.named_modules())
    names = list(modules) + [_full(n, p) for n, m in modules.items() for p, _ in m.named_parameters(recurse=False)]
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


def _coreml_targets(model: nn.Module, config: OptimizationConfig, report: dict,
                    importance: Optional[dict] = None) -> tuple[list[_Target], int]:
    """Jobs for every weight ``config`` palettizes (skips go straight into ``report``), and the worker count."""
    targets: list[_Target] = []
    workers = 1
    for module_name, module in model.named_modules():
        for param_name in supported_params(module):
            name = _full(module_name, param_name)
            param = getattr(module, param_name)
            cfg = config.resolve(module_name, module, param_name)
            if cfg is None:
                report[name] = _skip(module, "no config applies (None)", param.numel())
                continue
            if not cfg.applies_to(param.numel()):
                report[name] = _skip(module, f"{param.numel()} elements <= weight_threshold={cfg.weight_threshold}",
                                     param.numel())
                continue
            check_finite(f"{name} ({type(module).__name__})", param)
            spec = cfg.to_spec(n_bits=cfg.nbits if cfg.nbits is not None else 8)
            spec.check_shape(tuple(param.shape), name)
            imp = None if importance is None or cfg.mode != "kmeans" else importance.get(name)
            job = PalettizationJob(name=name, weight=param.detach().cpu().clone(), spec=spec, mode=cfg.mode,
                                   importance=imp, fixed_bits=cfg.nbits is not None)
            targets.append(_Target(module_name, module, param_name, job))
            workers = max(workers, cfg.num_kmeans_workers)
    base = _seed_base(t.job.spec for t in targets)
    for t in targets:
        t.job.seed = _job_seed(base, t.name)
    return targets, workers


def palettize_weights(model: nn.Module, config: Union[OptimizationConfig, OpPalettizerConfig, dict], *,
                      inplace: bool = False, return_report: bool = False, num_workers: Optional[int] = None):
    """Palettize ``model``'s supported weights after training, without data (coremltools ``palettize_weights``).

    Returns the palettized model (a deep copy unless ``inplace``), or ``(model, report)`` with
    ``return_report=True``: the report maps each supported weight's qualified name to a dict with ``status``
    (``palettized``/``skipped``), and either the LUT facts and ``mse`` or the ``reason`` it was skipped.
    ``num_workers`` defaults to the largest ``num_kmeans_workers`` in the config.
    """
    check_type("model", model, nn.Module)
    config = _as_optimization_config(config)
    _check_coreml_targets(model, config)
    if not inplace:
        model = copy.deepcopy(model)
    report: dict = {}
    targets, workers = _coreml_targets(model, config, report)
    _execute(targets, report, num_workers if num_workers is not None else workers)
    return (model, report) if return_report else model


# ----------------------------------------------------------------------------------------- spec style


def _as_kmeans_config(config: Any) -> KMeansPalettizerConfig:
    if config is None:
        return KMeansPalettizerConfig()
    if isinstance(config, KMeansPalettizerConfig):
        return config
    if isinstance(config, ModuleKMeansPalettizerConfig):
        return KMeansPalettizerConfig(global_config=config)
    if isinstance(config, dict):
        return KMeansPalettizerConfig.from_dict(config)
    raise TypeError("config must be a KMeansPalettizerConfig, a ModuleKMeansPalettizerConfig, a dict or None; "
                    f"got {type(config).__name__}.")


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

    def _targets(self, model: nn.Module, importance: Optional[dict] = None) -> list[_Target]:
        planned = self.config.plan(model)
        targets = []
        for p in planned:
            param = getattr(p.module, p.param_name)
            check_finite(f"{p.name} ({type(p.module).__name__})", param)
            imp = None if importance is None else importance.get(p.name)
            job = PalettizationJob(name=p.name, weight=param.detach().cpu().clone(), spec=p.spec, importance=imp)
            targets.append(_Target(p.module_name, p.module, p.param_name, job))
        base = _seed_base(t.job.spec for t in targets)
        for t in targets:
            t.job.seed = _job_seed(base, t.name)
        return targets

    def prepare(self, example_inputs: Any = None, num_workers: int = 1, inplace: bool = False) -> nn.Module:
        """Palettize and return the model. ``example_inputs`` is accepted for API compatibility (eager mode needs
        no tracing); ``num_workers > 1`` clusters weights in spawned worker processes."""
        check_int("num_workers", num_workers, minimum=1)
        model = self.model if inplace else copy.deepcopy(self.model)
        self._report = {}
        _execute(self._targets(model), self._report, num_workers)
        self._prepared = model
        return model

    def finalize(self, model: Optional[nn.Module] = None, inplace: bool = False) -> nn.Module:
        """Nothing left to do after ``prepare`` (weights are already LUT[indices]); returns the prepared model."""
        model = model if model is not None else self._prepared
        if model is None:
            raise RuntimeError("call prepare() before finalize().")
        return model

    def report(self) -> dict:
        """Per-weight facts from the last ``prepare``/``compress``: n_bits, LUT count, MSE, storage bits."""
        return dict(self._report)


# ----------------------------------------------------------------------------------------- sensitivity


class SensitiveKMeansPalettizer(KMeansPalettizer):
    """k-means weighted by each weight's sensitivity: the Fisher diagonal, i.e. squared gradients of the loss summed
    over calibration batches. Minimises ``sum_i F_i (w_i - c_{a(i)})^2``, a second-order estimate of the loss
    increase, instead of the plain squared error.

    Importance used by k-means: ``F / mean(F) + damping`` per tensor (``damping=0``: pure Fisher).
    ``config`` is a spec-style ``KMeansPalettizerConfig`` (default: 4-bit per-tensor) or a coremltools-style
    ``OptimizationConfig`` (its ``weight_threshold`` is honoured; ``uniform``/``unique`` modes ignore sensitivities).
    """

    def __init__(self, model: nn.Module, config: Any = None, damping: float = 1.0):
        check_number("damping", damping, minimum=0.0)
        self.damping = float(damping)
        self._coreml: Optional[OptimizationConfig] = None
        if isinstance(config, (OptimizationConfig, OpPalettizerConfig)):
            self._coreml = _as_optimization_config(config)
            config = None
        super().__init__(model, config)
        self.sensitivities: dict[str, torch.Tensor] = {}

    def _names(self) -> list[str]:
        if self._coreml is None:
            return [p.name for p in self.config.plan(self.model)]
        names = []
        for module_name, module in self.model.named_modules():
            for param_name in supported_params(module):
                cfg = self._coreml.resolve(module_name, module, param_name)
                if cfg is not None and cfg.applies_to(getattr(module, param_name).numel()):
                    names.append(_full(module_name, param_name))
        return names

    def compute_sensitivity(self, dataloader: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                            num_batches: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Fisher diagonal (raw sums of squared gradients) for every weight to palettize.
        ``loss_fn(model, batch)`` returns a scalar loss.
        Runs in eval mode with ``torch.autograd.grad``: the model's weights, ``.grad``, ``requires_grad`` and
        train/eval modes are as before afterwards."""
        if num_batches is not None:
            check_int("num_batches", num_batches, minimum=1)
        params = dict(self.model.named_parameters())
        names = self._names()
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"cannot compute sensitivities for {missing}: not plain parameters of the model.")
        tensors = [params[n] for n in names]
        modes = {m: m.training for m in self.model.modules()}
        requires = {id(p): p.requires_grad for p in tensors}
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
        seen = 0
        try:
            self.model.eval()
            for p in tensors:
                p.requires_grad_(True)
            with torch.enable_grad():
                for batch in dataloader:
                    if num_batches is not None and seen >= num_batches:
                        break
                    loss = loss_fn(self.model, batch)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise ValueError("loss_fn(model, batch) must return a scalar tensor.")
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    for f, g in zip(fisher, grads):
                        if g is not None:
                            f += g.detach().float() ** 2
                    seen += 1
        finally:
            for p in tensors:
                p.requires_grad_(requires[id(p)])
            for m, training in modes.items():
                m.training = training
        if seen == 0:
            raise ValueError("dataloader yielded no batches; sensitivities need at least one.")
        self.sensitivities = dict(zip(names, fisher))
        return self.sensitivities

    def compress(self, dataloader: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 num_batches: Optional[int] = None, num_workers: int = 1, inplace: bool = False) -> nn.Module:
        """Compute sensitivities on the calibration data, then palettize with sensitivity-weighted k-means."""
        self.compute_sensitivity(dataloader, loss_fn, num_batches)
        model = self.model if inplace else copy.deepcopy(self.model)
        self._report = {}
        importance = {n: _stabilize(f, self.damping) for n, f in self.sensitivities.items()}
        if self._coreml is None:
            targets = self._targets(model, importance)
        else:
            targets, _ = _coreml_targets(model, self._coreml, self._report, importance)
        _execute(targets, self._report, num_workers)
        self._prepared = model
        return model


def _stabilize(fisher: torch.Tensor, damping: float) -> torch.Tensor:
    """Importance ``F / mean(F) + damping`` (uniform when every sensitivity is zero); ``damping`` keeps weights
    with tiny estimated sensitivity in play (noisy Fisher estimates otherwise over-fit the calibration batches)."""
    mean = fisher.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(fisher)
    return fisher / mean + max(damping, 1e-6)
