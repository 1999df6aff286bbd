"""The steps of a recipe run: trainers and loggers, baseline training/loading, evaluation, DKM fine-tuning, export."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from dkm_palett.io import atomic_path, atomic_torch_save, atomic_write_text
from dkm_palett.recipes.progress import console_callbacks


def loggers(run_dir: Path, phase: str) -> list:
    """CSVLogger always (``<run>/logs/<phase>/metrics.csv``); TensorBoard too when it is installed."""
    out = [CSVLogger(save_dir=str(run_dir), name="logs", version=phase)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        from lightning.pytorch.loggers import TensorBoardLogger

        out.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=phase))
    return out


def extra_callbacks(cfg: DictConfig) -> list:
    """Every ``callbacks.<name>`` with a ``_target_`` except ``dkm``."""
    return [instantiate(node) for key, node in (cfg.get("callbacks") or {}).items()
            if key != "dkm" and node is not None and node.get("_target_")]


def make_trainer(cfg: DictConfig, run_dir: Path, phase: str, callbacks: list = (), log: bool = True,
                 label: Optional[str] = None, **overrides) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` with this phase's loggers and callbacks; the console shows ``label``."""
    console, bar = console_callbacks(label or phase, bool(cfg.trainer.get("enable_progress_bar", True)),
                                     training=phase != "eval")
    return instantiate(cfg.trainer, callbacks=list(callbacks) + console + extra_callbacks(cfg),
                       logger=loggers(run_dir, phase) if log else False, default_root_dir=str(run_dir),
                       enable_progress_bar=bar, **overrides)


class SampleCount(L.Callback):
    """How many validation samples were evaluated (the first dimension of each batch's inputs)."""

    def __init__(self):
        self.n = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.n += len(inputs)


def with_uncertainty(metrics: dict, n: int) -> dict:
    """Add ``n`` (validation samples) and, for an accuracy, ``accuracy_ci95``: the half-width of its 95% interval
    (normal approximation of the binomial, 1.96 * sqrt(p (1 - p) / n)), so a difference inside it reads as noise."""
    out = dict(metrics, n=int(n))
    if "accuracy" in metrics and n > 0:
        p = metrics["accuracy"]
        out["accuracy_ci95"] = 1.96 * math.sqrt(max(p * (1.0 - p), 0.0) / n)
    return out


def set_lr(lit: Any, lr: Any) -> None:
    """Set the module's ``lr`` attribute (read by its configure_optimizers) when the recipe gives one."""
    if lr is not None and hasattr(lit, "lr"):
        lit.lr = float(lr)


def evaluate(cfg: DictConfig, lit: L.LightningModule, datamodule: L.LightningDataModule, run_dir: Path,
             label: str = "evaluate") -> dict:
    """Run validation once; return the ``val_*`` metrics without the prefix (``accuracy``, ``loss``, ...), with the
    sample count ``n`` and the accuracy's 95% interval (:func:`with_uncertainty`)."""
    count = SampleCount()
    trainer = make_trainer(cfg, run_dir, "eval", callbacks=[count], log=False, label=label)
    results = trainer.validate(lit, datamodule=datamodule, verbose=False)
    metrics = {}
    for key, value in (results[0] if results else {}).items():
        name = key[4:] if key.startswith("val_") else key
        metrics[name] = float(value)
    if not metrics:
        raise ValueError("the model logged no validation metrics; log them in validation_step as val_<name> "
                         "(e.g. self.log('val_accuracy', ...)).")
    return with_uncertainty(metrics, count.n)


def train_baseline(cfg: DictConfig, lit: L.LightningModule, datamodule, run_dir: Path) -> L.Trainer:
    """Train the float baseline for ``baseline.max_epochs``, then save ``<run>/baseline.ckpt``."""
    set_lr(lit, cfg.baseline.get("lr"))
    trainer = make_trainer(cfg, run_dir, "baseline", label="baseline", max_epochs=int(cfg.baseline.max_epochs))
    trainer.fit(lit, datamodule=datamodule)
    atomic_torch_save({"state_dict": lit.state_dict()}, run_dir / "baseline.ckpt")
    return trainer


def baseline_key(cfg: DictConfig) -> str:
    """A hash of everything that shapes the trained float baseline (model, data, baseline, trainer except its DKM
    ``max_epochs``, extra callbacks, seed)."""
    plain = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "data", "trainer", "baseline")}
    plain["trainer"].pop("max_epochs", None)
    plain["baseline"].pop("checkpoint", None)
    plain["callbacks"] = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
                          for k, v in (cfg.get("callbacks") or {}).items() if k != "dkm"}
    plain["seed"] = cfg.seed
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_baseline(cfg: DictConfig, lit: L.LightningModule, datamodule, run_dir: Path,
                    cache: Optional[Path]) -> dict:
    """Train the float baseline, or load it from ``cache`` when an earlier run with the same :func:`baseline_key`
    stored it there (then return the training time it saved); a trained one is stored in ``cache``."""
    key = baseline_key(cfg)
    ckpt = meta = None
    if cache is not None:
        ckpt, meta = cache / f"baseline-{key}.ckpt", cache / f"baseline-{key}.json"
        if ckpt.is_file() and meta.is_file():
            load_baseline(lit, ckpt)
            return {"reused": str(ckpt), "saved_s": float(json.loads(meta.read_text())["train_s"])}
    started = time.perf_counter()
    train_baseline(cfg, lit, datamodule, run_dir)
    train_s = time.perf_counter() - started
    if cache is not None:
        with atomic_path(ckpt) as tmp:
            shutil.copyfile(run_dir / "baseline.ckpt", tmp)
        atomic_write_text(meta, json.dumps({"train_s": train_s, "run_dir": str(run_dir)}))
    return {"trained": str(run_dir / "baseline.ckpt"), "train_s": train_s}


def load_baseline(lit: L.LightningModule, path: Path) -> None:
    """Load a float checkpoint: ``{"state_dict": ...}`` (ours or Lightning's) or a bare state_dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a Lightning .ckpt with pickled hyper-parameters: the user's own file
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one clear line
        raise ValueError(f"baseline.checkpoint={str(path)!r} is not a readable torch checkpoint ({err}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"baseline.checkpoint={str(path)!r} holds a {type(state).__name__}, not a state_dict.")
    try:
        lit.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()
        detail = " ".join(line.strip() for line in first[1:3])
        raise ValueError(f"baseline.checkpoint={str(path)!r} does not match the model ({detail}); "
                         "it must come from the same model config.") from None


def export_kinds(cfg: DictConfig) -> tuple[tuple[str, ...], dict]:
    """The callback's ``exports`` for this config, and ``{kind: reason}`` for the ones that cannot run here."""
    kinds, skipped = [], {}
    if cfg.export.compressed:
        kinds.append("safetensors")
    if cfg.export.coreml:
        if importlib.util.find_spec("coremltools") is None:
            skipped["coreml"] = "coremltools is not installed (pip install 'dkm_palett[export]')"
        else:
            kinds.append("coreml")
    return tuple(kinds), skipped


def dkm_finetune(cfg: DictConfig, lit: L.LightningModule, datamodule, run_dir: Path, dkm_config,
                 phase: str = "dkm", export: bool = False, example: Any = None) -> tuple[Any, dict]:
    """Fine-tune with the DKM callback, which finalizes at fit end (and, with ``export``, writes the Core ML and
    portable files into ``<run>/<export.dir>``). Returns (callback, per-layer report)."""
    from dkm_palett.palettized_weight import palettized_tensors

    set_lr(lit, cfg.finetune.get("lr"))
    kwargs: dict[str, Any] = {"config": dkm_config}
    kinds, _ = export_kinds(cfg) if export else ((), {})
    if kinds:
        coreml_options = {"trace": cfg.export.get("trace", "torchscript")}
        if cfg.export.get("minimum_deployment_target"):
            coreml_options["minimum_deployment_target"] = cfg.export.minimum_deployment_target
        kwargs.update(export_dir=str(run_dir / cfg.export.dir), exports=kinds,
                      export_module=cfg.export.get("submodule") or None, example_inputs=example,
                      coreml_options=coreml_options)
    # (instantiate's own first parameter is named ``config``: bind the arguments through a partial)
    callback = instantiate(cfg.callbacks.dkm, _partial_=True)(**kwargs)
    trainer = make_trainer(cfg, run_dir, phase, callbacks=[callback], label=f"dkm {_bits(dkm_config)}-bit")
    trainer.fit(lit, datamodule=datamodule)
    palettizer = getattr(callback, "palettizer", None)
    if not any(True for _ in palettized_tensors(lit)):
        if palettizer is None:
            raise RuntimeError("the DKM callback left the model unfinalized and exposes no palettizer.")
        palettizer.finalize(model=lit, inplace=True)
    layers = dict(palettizer.report()) if palettizer is not None else {}
    return callback, layers


def _bits(dkm_config) -> Any:
    cfg = getattr(dkm_config, "global_config", None)
    return getattr(cfg, "n_bits", None) or "n"


def artifacts(cfg: DictConfig, callback: Any) -> dict:
    """``{kind: {path, file_bytes}}`` for what the callback exported (and why a requested export was skipped)."""
    out: dict[str, dict] = {}
    names = {"safetensors": "compressed", "coreml": "coreml", "report": "layer_report"}
    for kind, path in (getattr(callback, "export_paths", None) or {}).items():
        path = Path(path)
        size = _tree_bytes(path) if path.is_dir() else path.stat().st_size
        out[names.get(kind, kind)] = {"path": str(path), "file_bytes": size}
    for kind, reason in export_kinds(cfg)[1].items():
        out[kind] = {"path": None, "skipped": reason}
    return out


def example_inputs(lit: L.LightningModule, datamodule) -> Any:
    """``example_input_array``, or the inputs of the first validation batch (first sample)."""
    example = getattr(lit, "example_input_array", None)
    if example is not None:
        return example
    batch = next(iter(datamodule.val_dataloader()))
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return x[:1]


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
