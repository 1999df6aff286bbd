"""Entry point: ``python -m dkm_palett.recipes.train`` / ``dkm-palett-train`` (a Hydra app over the ``conf`` package).

One run: float baseline (trained or loaded) -> DKM fine-tuning with the Lightning callback -> finalize ->
evaluate -> Core ML + portable export -> report.json, plots, logs, summary table in the Hydra run dir.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

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


def run(cfg, run_dir: str | os.PathLike) -> dict:
    """Run the whole recipe for a composed config, writing into ``run_dir``; return the report dict."""
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from dkm_palett.recipes import phases
    from dkm_palett.recipes.config import build_dkm_config, check_layers, check_targets, resolve_checkpoint
    from dkm_palett.recipes.report import compression, primary_metric, summary, write_report

    _silence()
    _STATE["phase"] = "setup"
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    # -- fail fast: every check before any data is loaded or any step is trained
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
    phases.export_target(cfg, lit)
    _STATE["phase"] = "run"

    # -- float baseline
    timings = {}
    t = time.perf_counter()
    if checkpoint is not None:
        phases.load_baseline(lit, checkpoint)
    else:
        phases.train_baseline(cfg, lit, datamodule, run_dir)
    timings["baseline_s"] = time.perf_counter() - t
    baseline_metrics = phases.evaluate(cfg, lit, datamodule, run_dir)
    metric, _ = primary_metric(baseline_metrics)
    float_weights = {name: p.detach().cpu().clone() for name, p in lit.named_parameters()}
    example = phases.example_inputs(lit, datamodule)

    # -- DKM (one bit width, or the compare loop)
    t = time.perf_counter()
    report: dict = {"name": cfg.name, "mode": cfg.mode, "metric": metric}
    if cfg.mode == "compare":
        from dkm_palett.recipes.compare import run_compare

        state = {k: v.detach().clone() for k, v in lit.state_dict().items()}
        result = run_compare(cfg, datamodule, run_dir, state, baseline_metrics, example)
        chosen = result["chosen"]
        lit, layers = chosen["lit"], chosen["layers"]
        palettized_metrics = chosen["palettized"]
        report.update(post_training=chosen["post_training"], compare=result["rows"], compare_bits=chosen["n_bits"])
        artifacts = phases.artifacts(cfg, chosen["callback"])
    else:
        if cfg.get("reference_post_training", True) and cfg.palettization.n_bits is not None:
            from dkm_palett.recipes.compare import fresh_copy, post_training

            state = {k: v.detach().clone() for k, v in lit.state_dict().items()}
            ptq = post_training(cfg, fresh_copy(cfg, state), int(cfg.palettization.n_bits))
            report["post_training"] = phases.evaluate(cfg, ptq, datamodule, run_dir)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        callback, layers = phases.dkm_finetune(cfg, lit, datamodule, run_dir, dkm_configs[None], export=True,
                                               example=example)
        artifacts = phases.artifacts(cfg, callback)
        palettized_metrics = phases.evaluate(cfg, lit, datamodule, run_dir)
    timings["dkm_and_export_s"] = time.perf_counter() - t

    # -- report, plots
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if cfg.mode == "compare":
        resolved["palettization"]["n_bits"] = report["compare_bits"]
    report.update(
        baseline=baseline_metrics,
        palettized=palettized_metrics,
        compression=compression(phases.export_target(cfg, lit)),
        layers=layers,
        config=resolved,
        artifacts=artifacts,
        run_dir=str(run_dir),
        torch_threads=torch.get_num_threads(),
    )
    write_report(run_dir, report)
    report["plots"] = _plots(cfg, report, lit, float_weights, run_dir) if cfg.get("plots", True) else []
    timings["total_s"] = time.perf_counter() - started
    report["timings"] = timings
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
        ratios = {r["n_bits"]: r["compression"]["ratio"] for r in report["compare"]}
        out.append(str(plots.metric_vs_bits(run_dir / "compare.png", series, metric, report["baseline"][metric],
                                            f"{cfg.name}: post-training k-means vs DKM", ratios)))
    else:
        siblings = plots.sibling_reports(run_dir.parent, report)
        if len({r["config"]["palettization"]["n_bits"] for r in siblings}) >= 2:
            out += [str(p) for p in plots.bits_plot_from_reports(
                [run_dir / "metric_vs_bits.png", run_dir.parent / "metric_vs_bits.png"], siblings, metric,
                f"{cfg.name}: DKM {metric} vs bits ({len(siblings)} runs)")]
    return out


def _report_error(err: BaseException) -> None:
    """One line on stderr; errors after the config checks also say how to get the traceback."""
    hint = "" if _STATE["phase"] == "setup" else " (set HYDRA_FULL_ERROR=1 for the traceback)"
    print("error: " + " ".join(str(err).split()) + hint, file=sys.stderr, flush=True)


def main() -> None:
    """Console-script entry: parse Hydra's command line, run, exit 2 with one ``error:`` line on bad input."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    if os.getcwd() not in sys.path:  # like ``python -m``: the user's own modules (experiment=custom) import
        sys.path.append(os.getcwd())

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def _app(cfg) -> None:
        try:
            run(cfg, HydraConfig.get().runtime.output_dir)
        except (ValueError, TypeError, FileNotFoundError) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _report_error(err)
            sys.exit(2)

    _app()


if __name__ == "__main__":
    main()
