"""Post-training jobs: one picklable job per weight, run sequentially or in spawned workers, and the report rows."""

from __future__ import annotations

import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Iterable, Optional

import torch
from torch import nn

from dkm_palett.config.palettize_weights import OpPalettizerConfig
from dkm_palett.lut import PalettizedTensor
from dkm_palett.palettized_weight import attach
from dkm_palett.plan import PlannedWeight
from dkm_palett.post_training.clustering import cluster_weight
from dkm_palett.progress import progress_bar
from dkm_palett.report import record_stats, skipped_stats
from dkm_palett.spec import PalettizationSpec
from dkm_palett.validation import check_finite, check_int


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


def _run_job(job: PalettizationJob) -> tuple[Optional[PalettizedTensor], Optional[str]]:
    return cluster_weight(job.weight, job.spec, mode=job.mode, importance=job.importance, seed=job.seed,
                          name=job.name, fixed_bits=job.fixed_bits)


def _worker_init() -> None:
    torch.set_num_threads(1)


JobResult = tuple[Optional[PalettizedTensor], Optional[str]]


def run_jobs(jobs: list[PalettizationJob], num_workers: int = 1, progress: Optional[bool] = None) -> list[JobResult]:
    """Cluster every job, in ``num_workers`` spawned processes when > 1 (same results as sequential: each job
    carries its own seed), with a bar over the weights (``progress``, see ``dkm_palett.progress``). Scripts using
    workers need the usual ``if __name__ == '__main__':`` guard."""
    check_int("num_workers", num_workers, minimum=1)
    if num_workers == 1 or len(jobs) < 2:
        return [_run_job(job) for job in progress_bar(jobs, progress, "post-training k-means")]
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(num_workers, len(jobs)), mp_context=ctx,
                             initializer=_worker_init) as pool:
        return list(progress_bar(pool.map(_run_job, jobs), progress, "post-training k-means", total=len(jobs)))


def seed_base(specs: Iterable[PalettizationSpec]) -> int:
    """A seed drawn from torch's global RNG, only when some spec needs randomness (vector k-means)."""
    if any(s.cluster_dim > 1 for s in specs):
        return int(torch.randint(0, 2 ** 62, (1,)).item())
    return 0


def job_seed(base: int, name: str) -> int:
    return (base + zlib.crc32(name.encode())) % (2 ** 63)


def _entry(record: PalettizedTensor, original: torch.Tensor, mode: str, module: nn.Module) -> dict:
    return {**record_stats(record, original), "module_type": type(module).__name__, "mode": mode}


def skip_entry(module: nn.Module, reason: str, numel: int) -> dict:
    return skipped_stats(reason, module_type=type(module).__name__, n_params=numel)


PlannedJob = tuple[PlannedWeight, PalettizationJob]


def plan_jobs(planned: list[PlannedWeight], report: dict, importance: Optional[dict] = None) -> list[PlannedJob]:
    """One job per selected weight (a skipped weight goes into ``report`` with its reason); vector specs share one
    seed drawn from torch's global RNG. A weight's ``mode`` and fixed width come from its ``OpPalettizerConfig``
    (spec-style plans: k-means at the spec's width); ``importance`` (by weight name) weights k-means only."""
    jobs: list[PlannedJob] = []
    for p in planned:
        weight = p.weight
        if not p.selected:
            report[p.name] = skip_entry(p.module, p.reason, weight.numel())
            continue
        check_finite(f"{p.name} ({type(p.module).__name__})", weight)
        mode, fixed_bits = (p.config.mode, p.config.nbits is not None) if isinstance(p.config, OpPalettizerConfig) \
            else ("kmeans", True)
        imp = None if importance is None or mode != "kmeans" else importance.get(p.name)
        jobs.append((p, PalettizationJob(name=p.name, weight=weight.detach().cpu().clone(), spec=p.spec, mode=mode,
                                         importance=imp, fixed_bits=fixed_bits)))
    base = seed_base(job.spec for _, job in jobs)
    for p, job in jobs:
        job.seed = job_seed(base, p.name)
    return jobs


def execute(jobs: list[PlannedJob], report: dict, num_workers: int, progress: Optional[bool] = None) -> None:
    """Run the jobs and attach each record to its weight; every weight gets its report row."""
    results = run_jobs([job for _, job in jobs], num_workers, progress)
    for (p, job), (record, note) in zip(jobs, results):
        weight = p.weight
        if record is None:
            report[p.name] = skip_entry(p.module, note, weight.numel())
            continue
        original = weight.detach().clone()
        attach(p.module, p.param_name, record)
        report[p.name] = _entry(record, original, job.mode, p.module)
