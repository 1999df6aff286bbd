"""Entry point: ``python -m dkm_palett.recipes.train`` / ``dkm-palett-train`` (a Hydra app over the ``conf`` package).

One run: float baseline (trained or loaded) -> DKM fine-tuning with the Lightning callback -> finalize ->
evaluate -> Core ML + portable export -> report.json, plots, logs, summary table in the Hydra run dir.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dkm_palett.recipes.config import conf_dir

CONFIG_DIR = conf_dir()
_STATE = {"phase": "setup"}  # "setup" while checking the config, "run" once data loading/training has begun


def _silence() -> None:
    """Keep the console to the progress bar and the summary."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


@dataclass
class RecipeRun:
    """What the phases of one run share: the config, the run dir, the data and model, and what each phase adds."""

    cfg: Any
    run_dir: Path
    datamodule: Any
    lit: Any
    dkm_configs: dict
    checkpoint: Optional[Path]
    baseline_cache: Optional[Path] = None
    timings: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    float_weights: dict = field(default_factory=dict)
    example: Any = None


def run(cfg, run_dir: str | os.PathLike, baseline_cache: str | os.PathLike | None = None) -> dict:
    """Run the whole recipe for a composed config, writing into ``run_dir``; return the report dict.

    ``baseline_cache``: a folder where a trained float baseline is stored under a key of its resolved config and
    reused by later runs with the same key (the jobs of a ``-m`` sweep)."""
    _silence()
    started = time.perf_counter()
    _STATE["phase"] = "setup"
    state = setup_phase(cfg, run_dir, baseline_cache)
    _STATE["phase"] = "run"
    baseline_phase(state)
    dkm_phase(state)
    return report_phase(state, started)


def setup_phase(cfg, run_dir: str | os.PathLike, baseline_cache: str | os.PathLike | None) -> RecipeRun:
    """Every check before any data is loaded or any step is trained: config, targets, layers, output folders."""
    import lightning as L
    from hydra.utils import instantiate

    from dkm_palett.callbacks import export_target
    from dkm_palett.io import ensure_writable_dir
    from dkm_palett.recipes import phases
    from dkm_palett.recipes.config import build_dkm_config, check_layers, check_targets, resolve_checkpoint

    run_dir = ensure_writable_dir(Path(run_dir).resolve(), "run dir")
    check_targets(cfg)
    bits_to_check = [int(b) for b in cfg.compare.bits] if cfg.mode == "compare" else [None]
    dkm_configs = {b: build_dkm_config(cfg.palettization, b) for b in bits_to_check}
    checkpoint = resolve_checkpoint(cfg.baseline.get("checkpoint"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    lit = instantiate(cfg.model)
    if not isinstance(lit, L.LightningModule):
        raise TypeError(f"model._target_ must build a LightningModule, got {type(lit).__name__}.")
    for dkm_config in dkm_configs.values():
        check_layers(lit, dkm_config)
    export_target(lit, cfg.export.get("submodule"), "export.submodule")
    if phases.export_kinds(cfg)[0]:
        ensure_writable_dir(run_dir / cfg.export.dir, "export.dir")
    if baseline_cache is not None:
        baseline_cache = ensure_writable_dir(baseline_cache, "baseline cache")
    return RecipeRun(cfg, run_dir, datamodule, lit, dkm_configs, checkpoint, baseline_cache)


def baseline_phase(state: RecipeRun) -> None:
    """The float baseline: loaded (``baseline.checkpoint`` or the sweep's cache) or trained; then evaluated."""
    from dkm_palett.recipes import phases
    from dkm_palett.recipes.report import primary_metric

    cfg, lit = state.cfg, state.lit
    t = time.perf_counter()
    if state.checkpoint is not None:
        phases.load_baseline(lit, state.checkpoint)
        state.report["baseline_source"] = {"checkpoint": str(state.checkpoint)}
    else:
        state.report["baseline_source"] = phases.cached_baseline(cfg, lit, state.datamodule, state.run_dir,
                                                                 state.baseline_cache)
    state.timings["baseline_s"] = time.perf_counter() - t
    state.report["baseline"] = phases.evaluate(cfg, lit, state.datamodule, state.run_dir, label="baseline")
    state.report["metric"], _ = primary_metric(state.report["baseline"])
    state.float_weights = {name: p.detach().cpu().clone() for name, p in lit.named_parameters()}
    state.example = phases.example_inputs(lit, state.datamodule)


def dkm_phase(state: RecipeRun) -> None:
    """DKM fine-tuning at ``palettization.n_bits`` (with the post-training reference), or the compare loop."""
    import lightning as L

    from dkm_palett.recipes import phases
    from dkm_palett.recipes.compare import fresh_copy, post_training, run_compare
    from dkm_palett.recipes.config import planned_config

    cfg, report = state.cfg, state.report
    t = time.perf_counter()
    baseline_state = {k: v.detach().clone() for k, v in state.lit.state_dict().items()}
    if cfg.mode == "compare":
        result = run_compare(cfg, state.datamodule, state.run_dir, baseline_state, report["baseline"], state.example)
        chosen = result["chosen"]
        state.lit, report["layers"], report["palettized"] = chosen["lit"], chosen["layers"], chosen["palettized"]
        report.update(post_training=chosen["post_training"], compare=result["rows"], compare_bits=chosen["n_bits"])
        callback = chosen["callback"]
    else:
        if cfg.get("reference_post_training", True) and cfg.palettization.n_bits is not None:
            ptq = post_training(cfg, fresh_copy(cfg, baseline_state), int(cfg.palettization.n_bits))
            report["post_training"] = phases.evaluate(cfg, ptq, state.datamodule, state.run_dir,
                                                      label=f"post-training {int(cfg.palettization.n_bits)}-bit")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dkm_config = planned_config(cfg, state.lit, state.datamodule, state.dkm_configs[None])
        callback, report["layers"] = phases.dkm_finetune(cfg, state.lit, state.datamodule, state.run_dir,
                                                         dkm_config, export=True, example=state.example)
        report["palettized"] = phases.evaluate(cfg, state.lit, state.datamodule, state.run_dir,
                                               label=f"dkm {cfg.palettization.n_bits}-bit")
    report["artifacts"] = phases.artifacts(cfg, callback)
    state.timings["dkm_and_export_s"] = time.perf_counter() - t


def report_phase(state: RecipeRun, started: float) -> dict:
    """report.json, plots and the summary table."""
    import torch
    from omegaconf import OmegaConf

    from dkm_palett.callbacks import export_target
    from dkm_palett.recipes.report import compression, summary, write_report

    cfg, run_dir = state.cfg, state.run_dir
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if cfg.mode == "compare":
        resolved["palettization"]["n_bits"] = state.report["compare_bits"]
    report = {"name": cfg.name, "mode": cfg.mode, **state.report}
    report.update(
        compression=compression(export_target(state.lit, cfg.export.get("submodule"), "export.submodule")),
        config=resolved,
        run_dir=str(run_dir),
        torch_threads=torch.get_num_threads(),
    )
    write_report(run_dir, report)
    report["plots"] = _plots(cfg, report, state.lit, state.float_weights, run_dir) if cfg.get("plots", True) else []
    report["timings"] = {**state.timings, "total_s": time.perf_counter() - started}
    write_report(run_dir, report)
    print("\n" + summary(report, run_dir), flush=True)
    return report


def _plots(cfg, report: dict, lit, float_weights: dict, run_dir: Path) -> list[str]:
    from dkm_palett.recipes import plots

    metric = report["metric"]
    bits = report["config"]["palettization"].get("n_bits")
    out = []
    hist = plots.weight_histograms(run_dir / "weights.png", float_weights, lit,
                                   f"{cfg.name}: float baseline weights (gray) and learned {bits}-bit centroids (red)")
    if hist:
        out.append(str(hist))
    if cfg.mode == "compare":
        series = {"post-training k-means": [(r["n_bits"], r["post_training"][metric]) for r in report["compare"]],
                  "DKM fine-tuning": [(r["n_bits"], r["dkm"][metric]) for r in report["compare"]]}
        ratios = {r["n_bits"]: r["compression"]["compression_ratio"] for r in report["compare"]}
        errors = {label: {r["n_bits"]: r[key][f"{metric}_ci95"] for r in report["compare"] if f"{metric}_ci95" in r[key]}
                  for label, key in (("post-training k-means", "post_training"), ("DKM fine-tuning", "dkm"))}
        out.append(str(plots.metric_vs_bits(run_dir / "compare.png", series, metric, report["baseline"][metric],
                                            f"{cfg.name}: post-training k-means vs DKM", ratios, errors)))
    else:
        siblings = plots.sibling_reports(run_dir.parent, report)
        if len({r["config"]["palettization"]["n_bits"] for r in siblings}) >= 2:
            out += [str(p) for p in plots.bits_plot_from_reports(
                [run_dir / "metric_vs_bits.png", run_dir.parent / "metric_vs_bits.png"], siblings, metric,
                f"{cfg.name}: DKM {metric} vs bits ({len(siblings)} runs)")]
    return out


def _report_error(err: BaseException) -> None:
    """One line on stderr; errors after the config checks also say how to get the traceback."""
    from dkm_palett.recipes.cli import print_error

    hint = "" if _STATE["phase"] == "setup" else " (traceback in train.log, or set HYDRA_FULL_ERROR=1)"
    print_error(str(err) + hint)


def _sweep_baseline_cache(hydra_config) -> Optional[Path]:
    """``<sweep dir>/baselines`` in a ``-m`` run with ``baseline.reuse_in_sweep``, else None."""
    from hydra.types import RunMode

    if hydra_config.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_config.sweep.dir) / "baselines"


def main() -> None:
    """Console-script entry: parse Hydra's command line, run, exit 2 with one ``error:`` line on bad input."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from dkm_palett.recipes.cli import check_override_keys, record_failure

    if os.getcwd() not in sys.path:  # like ``python -m``: the user's own modules (experiment=custom) import
        sys.path.append(os.getcwd())
    try:
        check_override_keys(sys.argv[1:])
    except ValueError as err:
        _report_error(err)
        sys.exit(2)

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def _app(cfg) -> None:
        hydra_config = HydraConfig.get()
        run_dir = Path(hydra_config.runtime.output_dir)
        cache = _sweep_baseline_cache(hydra_config) if cfg.baseline.get("reuse_in_sweep", True) else None
        try:
            run(cfg, run_dir, baseline_cache=cache)
        except Exception as err:
            known = isinstance(err, (ValueError, TypeError, FileNotFoundError))
            record_failure(run_dir, err, config_error=known and _STATE["phase"] == "setup")
            if not known or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _report_error(err)
            sys.exit(2)

    _app()


if __name__ == "__main__":
    main()
