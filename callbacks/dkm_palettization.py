"""DKMPalettizationCallback: DKM palettization of a LightningModule during ``Trainer.fit``.

Lifecycle (every hook delegates to :class:`dkm_palett.palettizer.DKMPalettizer` or the export functions):

- ``setup(stage="fit")``: prepares the LightningModule in place (before checkpoint restore, DDP wrapping and
  optimizer creation, so ``ckpt_path=`` resume and DDP see the DKM parameters and buffers); layers the module builds
  in ``configure_model`` (which Lightning calls right after ``setup``) are prepared as soon as that hook returns. A
  module that is already prepared is not prepared again and keeps its step count (also with a fresh callback in a
  second Trainer); a module finalized by an earlier ``fit`` is prepared afresh from its palettized weights, so a
  second ``fit`` keeps fine-tuning with DKM. If that ``fit`` fails before training starts (e.g. a ``ckpt_path`` that
  does not exist), the module is given back finalized, as it was.
- ``on_train_batch_end``: one ``DKMPalettizer.step()`` per training batch that ran an optimizer step
  (``trainer.global_step`` advanced): with ``accumulate_grad_batches=N`` a milestone of ``m`` means ``m`` optimizer
  steps (``m * N`` batches); with manual optimization and several optimizers it still means ``m`` batches. Logs
  ``dkm/<weight>/error`` (FakePalettize.last_error, RMS clustering error of the last training forward) for active
  layers, ``dkm/active_layers``, ``dkm/waiting_layers`` (milestone not reached yet) and ``dkm/step``.
- ``on_fit_end``: (DDP: copies rank 0's DKM buffers to every rank) finalizes in place, keeps ``report``, logs
  ``dkm_final/<weight>/rms_error`` and, when ``export_dir`` is set, writes on global rank 0 only:
  ``<stem>.mlpackage`` (Core ML), ``<stem>.safetensors`` (portable, :func:`dkm_palett.export.load_compressed`) and
  ``<stem>.report.json``. validate/test/predict after fit therefore run the finalized model. If the export fails,
  every rank raises the same :class:`ExportError` (one process: the export's own error).
- ``on_exception`` (KeyboardInterrupt, errors): does *not* finalize. The module stays prepared with all DKM state in
  its buffers and this callback's ``state_dict``, so ``trainer.save_checkpoint`` / the last ``ModelCheckpoint`` can
  be resumed with ``trainer.fit(..., ckpt_path=...)``.

Checkpoints: the module's buffers (centroids, initialized, enabled, steps, ...) travel in the model state_dict; the
callback's ``state_dict`` holds only primitives (step count, finalized flag, the config as a plain dict), so
Lightning's ``weights_only=True`` loading works. To load a mid-palettization checkpoint into a fresh module outside
of ``fit``, use :meth:`DKMPalettizationCallback.load_prepared`. A plain ``LitModule.load_from_checkpoint`` cannot (the
state_dict holds the DKM layers, which only a prepared module has); while prepared, the module carries an empty
buffer named ``dkm_palett_prepared__load_with__DKMPalettizationCallback_load_prepared``, so torch's "Unexpected
key(s)" error of such a load names ``load_prepared`` first.

``ddp_spawn``: the workers finalize and export; the main process's module receives the finalized weights with their
LUT records (Lightning loads rank 0's state_dict into it, and a finalized weight is a
:class:`~dkm_palett.palettized_weight.PalettizedWeight` that carries its record through a state_dict). The callback's
own state (``report``, ``export_paths``) stays in the workers.
"""

from __future__ import annotations

import math

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from dkm_palett.config.training import DKMPalettizerConfig, ModuleDKMPalettizerConfig, load_dkm_config
from dkm_palett.io import atomic_write_text
from dkm_palett.callbacks.lifecycle import (MARKER, PALETTIZERS, check_untracked, export_target, is_prepared,
                                            mark_prepared, raise_on_every_rank, unprepare)
from dkm_palett.palettizer import DKMPalettizer, fake_palettizers
from dkm_palett.validation import check_choice, check_keys, check_type

EXPORTS = ("coreml", "safetensors")
COREML_OPTIONS = ("minimum_deployment_target", "trace", "compute_precision", "verbose")
STATE_VERSION = 1
STATE_KEY = "DKMPalettizationCallback"


class DKMPalettizationCallback(Callback):
    """Palettize the LightningModule with DKM during ``fit``; finalize and (optionally) export at fit end.

    Args:
        config: a ``DKMPalettizerConfig``, a ``ModuleDKMPalettizerConfig`` (global), a plain dict, a YAML path, or
            None (defaults). Validated here. From LightningCLI YAML: ``init_args: {config: {global_config: ...}}``
            or ``config: path/to/dkm.yaml`` (relative to the working directory).
        export_dir: folder for the exports (created if missing); None: no export.
        exports: which exports to write, any of ``"coreml"`` and ``"safetensors"``.
        export_module: export this attribute of the LightningModule (e.g. ``"net"``) instead of the module itself.
        example_inputs: tracing inputs for Core ML; default: the exported module's (else the LightningModule's)
            ``example_input_array``.
        coreml_options: extra arguments of :func:`dkm_palett.export.export_coreml` (``minimum_deployment_target``,
            ``trace``, ``compute_precision``, ``verbose``).
        file_stem: file name stem of the exports (``model`` -> ``model.mlpackage``, ``model.safetensors``).
        log_layer_errors: log the per-layer clustering error every training batch.
    """

    def __init__(
        self,
        # dict and str first: LightningCLI (jsonargparse) then hands a YAML mapping or path to load_dkm_config as is,
        # so its validation errors are the ones users see.
        config: Union[dict, str, os.PathLike, DKMPalettizerConfig, ModuleDKMPalettizerConfig, None] = None,
        export_dir: Optional[Union[str, os.PathLike]] = None,
        exports: Union[str, tuple, list] = EXPORTS,
        export_module: Optional[str] = None,
        example_inputs: Any = None,
        coreml_options: Optional[dict] = None,
        file_stem: str = "model",
        log_layer_errors: bool = True,
    ):
        super().__init__()
        self.config: DKMPalettizerConfig = load_dkm_config(config)
        if export_dir is not None:
            check_type("export_dir", export_dir, (str, os.PathLike))
        self.export_dir = None if export_dir is None else Path(export_dir)
        exports = (exports,) if isinstance(exports, str) else exports
        if not hasattr(exports, "__iter__"):
            raise TypeError(f"exports must be a string or a list of strings, got {type(exports).__name__}.")
        exports = tuple(exports)  # also accepts an omegaconf ListConfig
        for kind in exports:
            check_choice("exports", kind, EXPORTS)
        self.exports = tuple(dict.fromkeys(exports))
        if export_dir is not None and "coreml" in self.exports and importlib.util.find_spec("coremltools") is None:
            raise ValueError("exports includes 'coreml' but coremltools is not installed "
                             "(pip install 'dkm_palett[export]'); or pass exports=('safetensors',).")
        if export_module is not None:
            check_type("export_module", export_module, str)
        self.export_module = export_module
        self.example_inputs = example_inputs
        self.coreml_options = dict(coreml_options or {})
        check_keys("coreml_options", self.coreml_options, COREML_OPTIONS)
        check_type("file_stem", file_stem, str)
        if not file_stem or os.sep in file_stem:
            raise ValueError(f"file_stem={file_stem!r} must be a non-empty file name without a folder.")
        self.file_stem = file_stem
        check_type("log_layer_errors", log_layer_errors, bool)
        self.log_layer_errors = log_layer_errors

        self.palettizer: Optional[DKMPalettizer] = None
        self.finalized = False
        self.report: dict = {}
        self.export_paths: dict[str, Path] = {}
        self._pending_step_count: Optional[int] = None
        self._last_global_step = 0
        self._added: dict[str, Any] = {}  # weights this setup prepared -> their earlier record, until training starts

    # ------------------------------------------------------------------------------------ properties
    @property
    def step_count(self) -> int:
        """Optimizer steps counted by the palettizer (milestones compare against this)."""
        if self.palettizer is None:
            return int(self._pending_step_count or 0)
        return self.palettizer.step_count

    @property
    @override
    def state_key(self) -> str:
        return STATE_KEY

    # ------------------------------------------------------------------------------------ fit start
    @override
    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._check_export_inputs(pl_module)
        self._prepare(trainer, pl_module, warn_if_empty=not is_overridden("configure_model", pl_module))
        if is_overridden("configure_model", pl_module):
            self._prepare_after_configure_model(trainer, pl_module)
        self.finalized = False

    def _prepare(self, trainer: "L.Trainer", pl_module: "L.LightningModule", warn_if_empty: bool = True) -> None:
        """Prepare ``pl_module`` in place (idempotent), continuing the step count of the palettizer that prepared it."""
        if self.palettizer is None or self.palettizer.model is not pl_module:
            self.palettizer = DKMPalettizer(pl_module, self.config)
            earlier = PALETTIZERS.get(pl_module)
            if earlier is not None and is_prepared(pl_module):
                self.palettizer.step_count = earlier.step_count  # a second Trainer on a still-prepared module
            elif is_prepared(pl_module) and self._pending_step_count is None:
                check_untracked(pl_module)
        if self._pending_step_count is not None:
            self.palettizer.step_count = self._pending_step_count
            self._pending_step_count = None
        before = {name for name, _, _, _ in fake_palettizers(pl_module)}
        records = self.palettizer.records()  # of an earlier finalize; prepare turns those weights dense again
        self.palettizer.prepare(inplace=True)  # idempotent: prepared weights are left alone
        mark_prepared(pl_module, is_prepared(pl_module))
        self._added.update({name: records.get(name) for name, _, _, _ in fake_palettizers(pl_module)
                            if name not in before})
        PALETTIZERS[pl_module] = self.palettizer
        if warn_if_empty and not is_prepared(pl_module):
            rank_zero_warn("DKMPalettizationCallback: the config selects no weight of this module; nothing will be "
                           "palettized (check weight_threshold and the module configs).")

    def _prepare_after_configure_model(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Lightning calls ``configure_model`` after ``setup`` and before checkpoint restore, DDP wrapping and the
        optimizers: prepare the layers it creates right after it returns."""
        configure_model = pl_module.configure_model

        def configure_then_prepare() -> None:
            try:
                configure_model()
            finally:
                del pl_module.configure_model  # back to the class's own hook
            self._prepare(trainer, pl_module)

        pl_module.configure_model = configure_then_prepare

    def _example(self, pl_module: "L.LightningModule") -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        example = getattr(export_target(pl_module, self.export_module), "example_input_array", None)
        return pl_module.example_input_array if example is None else example

    def _check_export_inputs(self, pl_module: "L.LightningModule") -> None:
        """Fail before training, not after it, when an export could not run."""
        if self.export_dir is None:
            return
        export_target(pl_module, self.export_module)
        if "coreml" in self.exports and self._example(pl_module) is None:
            raise ValueError("exports includes 'coreml' but there is no example input: set the LightningModule's "
                                 "example_input_array or pass example_inputs= to DKMPalettizationCallback.")

    @override
    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._last_global_step = trainer.global_step  # after checkpoint restore
        remaining = trainer.estimated_stepping_batches - trainer.global_step
        if self.palettizer is not None and math.isfinite(remaining):  # the end-of-training schedules' horizon
            self.palettizer.total_steps = self.palettizer.step_count + max(0, int(remaining))
        if self._added:  # this fit prepared a finalized module again: drop the records of that finalize
            self.palettizer.forget_records()
            self._added = {}

    # ------------------------------------------------------------------------------------ per batch
    @override
    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.palettizer is None:
            return
        if trainer.global_step > self._last_global_step:  # this batch ran at least one optimizer step
            self.palettizer.step()
        self._last_global_step = trainer.global_step
        self._log_progress(pl_module)

    def _log_progress(self, pl_module: "L.LightningModule") -> None:
        active = waiting = 0
        for name, _, _, fp in fake_palettizers(pl_module):
            if bool(fp.enabled):
                active += 1
                if self.log_layer_errors and int(fp.steps) > 0:
                    pl_module.log(f"dkm/{name}/error", fp.last_error.detach().clone(), on_step=True, on_epoch=False)
            else:
                waiting += 1
        pl_module.log("dkm/active_layers", float(active), on_step=True, on_epoch=False)
        pl_module.log("dkm/waiting_layers", float(waiting), on_step=True, on_epoch=False)
        pl_module.log("dkm/step", float(self.palettizer.step_count), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------------ fit end
    @override
    def on_fit_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.palettizer is None or self.finalized:
            return
        if trainer.world_size > 1:
            self._copy_rank_zero_state(trainer, pl_module)
        self.palettizer.finalize(inplace=True)
        mark_prepared(pl_module, False)
        self.finalized = True
        self.report = dict(self.palettizer.report())
        final = {f"dkm_final/{name}/rms_error": row["rms_error"] for name, row in self.report.items()
                 if isinstance(row.get("rms_error"), float)}
        for logger in trainer.loggers:
            if final:
                logger.log_metrics(final, step=trainer.global_step)
        if self.export_dir is not None:
            error = None
            if trainer.is_global_zero:
                try:
                    self.export_paths = self.export(pl_module)
                except Exception as err:  # noqa: BLE001 - every rank raises it below
                    error = err
            raise_on_every_rank(trainer, error, f"the export to {str(self.export_dir)!r} failed on global rank 0")

    def _copy_rank_zero_state(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """All ranks finalize from rank 0's DKM buffers, so every rank holds the same LUTs."""
        state = {name: {k: v.detach().cpu() for k, v in fp.state_dict().items()}
                 for name, _, _, fp in fake_palettizers(pl_module)}
        state = trainer.strategy.broadcast(state, src=0)
        for name, _, _, fp in fake_palettizers(pl_module):
            fp.load_state_dict(state[name])

    def export(self, pl_module: "L.LightningModule") -> dict[str, Path]:
        """Write the selected exports of the finalized module to ``export_dir``; returns ``{kind: path}``."""
        from dkm_palett.export import save_compressed

        folder = self.export_dir
        folder.mkdir(parents=True, exist_ok=True)
        target = export_target(pl_module, self.export_module)
        paths: dict[str, Path] = {}
        if "safetensors" in self.exports:
            paths["safetensors"] = folder / f"{self.file_stem}.safetensors"
            save_compressed(target, paths["safetensors"])
        if "coreml" in self.exports:
            from dkm_palett.export import export_coreml

            example = self._example(pl_module)
            paths["coreml"] = export_coreml(target, example, path=folder / f"{self.file_stem}.mlpackage",
                                            **self.coreml_options)
        paths["report"] = folder / f"{self.file_stem}.report.json"
        atomic_write_text(paths["report"], json.dumps(self.report, indent=2, sort_keys=True, default=str))
        return paths

    # ------------------------------------------------------------------------------------ interruption
    @override
    def on_exception(self, trainer: "L.Trainer", pl_module: "L.LightningModule", exception: BaseException) -> None:
        """Leave the prepared module and the DKM state untouched (no finalize): it can be checkpointed and resumed.

        A fit that fails before training starts (e.g. a ``ckpt_path`` that does not exist) takes back what this
        ``setup`` prepared, so a finalized module stays finalized."""
        if self._added:
            self.palettizer.restore_records(self._added)
            unprepare(pl_module)
            self._added = {}
            return
        if self.palettizer is not None and not self.finalized:
            rank_zero_info(f"DKMPalettizationCallback: fit stopped at DKM step {self.step_count} "
                           f"({type(exception).__name__}); the module stays prepared (not finalized) and can be "
                           "checkpointed and resumed with trainer.fit(..., ckpt_path=...).")

    # ------------------------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "step_count": int(self.step_count), "finalized": bool(self.finalized),
                "config": self.config.as_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_keys("DKMPalettizationCallback state", state_dict, ("version", "step_count", "finalized", "config"))
        if state_dict.get("config") is not None and state_dict["config"] != self.config.as_dict():
            rank_zero_warn("DKMPalettizationCallback: the checkpoint was written with a different DKM config; "
                           "resuming with the config given to this callback.")
        if state_dict.get("finalized"):
            rank_zero_warn("DKMPalettizationCallback: the checkpoint was saved after finalize; DKM restarts from "
                           "its palettized weights.")
        step_count = int(state_dict["step_count"])
        if self.palettizer is None:
            self._pending_step_count = step_count
        else:
            self.palettizer.load_state_dict({"step_count": step_count})

    # ------------------------------------------------------------------------------------ outside of fit
    @classmethod
    def load_prepared(cls, module: torch.nn.Module, ckpt_path: Union[str, os.PathLike], config: Any = None,
                      finalize: bool = False) -> torch.nn.Module:
        """Load a checkpoint saved during DKM fine-tuning into a fresh (unprepared) ``module``.

        Prepares ``module`` in place with ``config`` (default: the config stored in the checkpoint), loads the
        weights and DKM buffers (strict) and the step count; with ``finalize=True`` also finalizes, so the module
        holds LUT[indices] weights ready for export. Returns ``module``. To continue training, prefer
        ``trainer.fit(module, ckpt_path=...)`` with the callback instead.
        """
        check_type("finalize", finalize, bool)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"ckpt_path={str(ckpt_path)!r} is not a Lightning checkpoint (no 'state_dict').")
        state = ckpt.get("callbacks", {}).get(STATE_KEY)
        if state is None and config is None:
            raise ValueError(f"ckpt_path={str(ckpt_path)!r} holds no DKMPalettizationCallback state; pass config=.")
        palettizer = DKMPalettizer(module, state["config"] if config is None else config)
        palettizer.prepare(inplace=True)
        mark_prepared(module, MARKER in ckpt["state_dict"])
        module.load_state_dict(ckpt["state_dict"])
        palettizer.load_state_dict({"step_count": int(state["step_count"]) if state else 0})
        if finalize:
            palettizer.finalize(inplace=True)
            mark_prepared(module, False)
        return module
