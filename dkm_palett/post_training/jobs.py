"""Post-training jobs: one picklable job per weight, run sequentially or in spawned workers, and the report rows."""

from __future__ import annotations

import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Iterable, Optional

import torch
from torch import nn

from dkm_palett.lut import PalettizedTensor, attach
from dkm_palett.post_training.clustering import cluster_weight
from dkm_palett.progress import progress_bar
from dkm_palett.report import record_stats, skipped_stats
from dkm_palett.spec import PalettizationSpec
from dkm_palett.validation import check_int


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


@dataclass
class Target:
    module_name: str
    module: nn.Module
    param_name: str
    job: PalettizationJob

    @property
    def name(self) -> str:
        return self.job.name


def execute(targets: list[Target], report: dict, num_workers: int, progress: Optional[bool] = None) -> None:
    results = run_jobs([t.job for t in targets], num_workers, progress)
    for target, (record, note) in zip(targets, results):
        param = getattr(target.module, target.param_name)
        if record is None:
            report[target.name] = skip_entry(target.module, note, param.numel())
            continue
        original = param.detach().clone()
        attach(target.module, target.param_name, record)
        report[target.name] = _entry(record, original, target.job.mode, target.module)


def full_name(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name
