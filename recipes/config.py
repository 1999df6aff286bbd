"""Where the Hydra configs live, and the up-front checks that make a bad override fail before any training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def conf_dir() -> str:
    """Absolute path of the Hydra configs: the ``dkm_palett.conf`` package (``conf/`` in the source tree)."""
    from importlib.resources import files

    return str(files("dkm_palett.conf"))


#: keys of the ``palettization`` group that are no ModuleDKMPalettizerConfig field: ``average_bits`` (mixed bit
#: widths planned by ``dkm_palett.mixed_bits.plan_bits`` on training batches before DKM fine-tuning)
RECIPE_KEYS = ("average_bits",)
PLAN_BATCHES = 32  # training batches for plan_bits' sensitivities


def field_names() -> tuple[str, ...]:
    """The keys the ``palettization`` group accepts: the fields of ``ModuleDKMPalettizerConfig`` and
    ``RECIPE_KEYS``."""
    import dataclasses

    from dkm_palett.config.training import ModuleDKMPalettizerConfig

    return tuple(f.name for f in dataclasses.fields(ModuleDKMPalettizerConfig)) + RECIPE_KEYS


def _prefixed(err: Exception, where: str = "palettization") -> Exception:
    """Re-raise ``err`` with ``palettization.`` before the field it names (``palettization.n_bits=5 ...``)."""
    msg = " ".join(str(err).split())
    if msg.split("=")[0].split(" ")[0] in field_names():
        msg = f"{where}.{msg}"
    else:
        msg = f"{where}: {msg}"
    return type(err)(msg)


def build_dkm_config(palettization: Any, n_bits: int | None = None):
    """``DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(**palettization))``; ``n_bits`` overrides."""
    from dkm_palett.config.training import DKMPalettizerConfig, ModuleDKMPalettizerConfig

    data = OmegaConf.to_container(palettization, resolve=True) if isinstance(palettization, DictConfig) \
        else dict(palettization)
    if n_bits is not None:
        data["n_bits"] = n_bits
    for key in RECIPE_KEYS:
        data.pop(key, None)
    try:
        return DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig.from_dict(data))
    except (ValueError, TypeError) as err:
        raise _prefixed(err) from None


def check_layers(model, dkm_config) -> list[str]:
    """Plan ``dkm_config`` on ``model`` (the plan ``DKMPalettizer.prepare`` consumes) without touching the model;
    raise ValueError naming the layer and field when a weight cannot take it, or when no weight is selected.
    Returns the selected weight names."""
    try:
        planned = dkm_config.plan(model)
    except (ValueError, TypeError) as err:
        raise _prefixed(err) from None
    selected = [p.name for p in planned if p.selected]
    if not selected:
        largest = max((p.weight.numel() for p in planned if p.param_name is not None), default=0)
        threshold = dkm_config.global_config.weight_threshold if dkm_config.global_config else None
        raise ValueError(f"palettization.weight_threshold={threshold} leaves no weight to palettize (the largest "
                         f"supported weight has {largest} elements); lower it below {largest}.")
    return selected


def resolve_checkpoint(path: Any) -> Path | None:
    """The baseline checkpoint as an absolute path (relative to the launch folder), or a clear error."""
    if path in (None, ""):
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"baseline.checkpoint must be a path or null, got {type(path).__name__} ({path!r}).")
    resolved = Path(os.path.expanduser(os.fspath(path)))
    if not resolved.is_absolute():
        resolved = Path(os.getcwd()) / resolved
    if not resolved.is_file():
        raise FileNotFoundError(
            f"baseline.checkpoint={os.fspath(path)!r} does not exist (looked at {resolved}); pass the "
            "baseline.ckpt of an earlier run (outputs/<experiment>/<time>/baseline.ckpt) or baseline.checkpoint=null "
            "to train a baseline.")
    return resolved


def check_targets(cfg: DictConfig) -> None:
    """``model`` and ``data`` need a ``_target_`` (the custom experiment leaves them to the user)."""
    for group in ("model", "data"):
        node = cfg.get(group)
        if node is None or OmegaConf.is_missing(node, "_target_") or not node.get("_target_"):
            raise ValueError(f"{group}._target_ is not set; the custom experiment needs "
                             f"model._target_=<your LightningModule class> and data._target_=<your "
                             "LightningDataModule class> (dotted import paths).")
    if cfg.mode not in ("train", "compare"):
        raise ValueError(f"mode={cfg.mode!r} is not allowed; allowed values: 'train', 'compare'.")
    average_bits = cfg.palettization.get("average_bits")
    if average_bits is not None:
        from dkm_palett.validation import check_number

        try:
            check_number("average_bits", average_bits, minimum=0.0, strict_min=True)
        except (ValueError, TypeError) as err:
            raise _prefixed(err) from None
        if cfg.mode == "compare":
            raise ValueError("palettization.average_bits plans mixed bit widths for mode=train; mode=compare runs "
                             "each of compare.bits uniformly. Drop one of them.")


def planned_config(cfg: DictConfig, lit: Any, datamodule: Any, dkm_config: Any) -> Any:
    """``dkm_config``, or with ``palettization.average_bits`` set, ``plan_bits`` of it on ``PLAN_BATCHES`` training
    batches (the LightningModule's output against the batch's targets, cross-entropy)."""
    average_bits = cfg.palettization.get("average_bits")
    if average_bits is None:
        return dkm_config
    from dkm_palett.mixed_bits import plan_bits

    datamodule.setup("fit")
    return plan_bits(lit, datamodule.train_dataloader(), float(average_bits), config=dkm_config,
                     num_batches=PLAN_BATCHES)
