"""DKMPalettizer: prepare (insert DKM layers), step (milestones), finalize (LUT[indices] weights), report."""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from dkm_palett import heap, recompute, schedule
from dkm_palett.budget import MemoryBudget
from dkm_palett.config.training import DKMPalettizerConfig, ModuleDKMPalettizerConfig, load_dkm_config
from dkm_palett.fake_palettize import FakePalettize
from dkm_palett.layer_settings import DKMLayerSettings
from dkm_palett.lut import PalettizedTensor
from dkm_palett.module_support import is_supported
from dkm_palett.palettized_weight import attach, make_dense, palettized_tensors
from dkm_palett.plots import weight_histogram
from dkm_palett.progress import LayerProgress, progress_bar, show_progress
from dkm_palett.report import Report, record_stats, skipped_stats


def _activation_hook(module: nn.Module, _inputs, output):
    fq = module.activation_fake_quant
    if isinstance(output, tuple):
        return (fq(output[0]),) + tuple(output[1:])
    return fq(output)


def fake_palettizers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, FakePalettize]]:
    """Yield ``(qualified_name, module, param_name, FakePalettize)`` for every prepared weight."""
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            for fp in plist:
                if isinstance(fp, FakePalettize):
                    full = f"{mod_name}.{param_name}" if mod_name else param_name
                    yield full, module, param_name, fp


class DKMPalettizer:
    """Palettize a model with DKM: ``prepare`` -> train with ``step()`` per batch -> ``finalize`` -> ``report``.

    ``progress``: a bar over the layers' k-means initialisation (which runs in the first forward after a layer's
    milestone) and over ``finalize``; ``None`` shows them in interactive sessions only (see ``dkm_palett.progress``).
    """

    def __init__(self, model: nn.Module, config: Any = None, progress: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.config: DKMPalettizerConfig = load_dkm_config(config)
        self.show_progress = show_progress(progress)
        self.step_count = 0
        #: the run's training steps (``step()`` calls), for the end-of-training schedules of configs that leave
        #: ``total_steps`` unset (DKMPalettizationCallback sets it from the Trainer); see dkm_palett.schedule
        self.total_steps: Optional[int] = None
        self.skipped: dict[str, str] = {}
        self._final_stats: dict[str, dict] = {}
        self._final_histograms: dict[str, tuple] = {}  # of the float weights, for Report.plot() after finalize

    # ------------------------------------------------------------------------------------ prepare
    def prepare(self, inplace: bool = False) -> nn.Module:
        """Insert a FakePalettize parametrization on every weight the config plans (``config.plan``); weights it
        skips are listed in the report with their reason."""
        model = self.model if inplace else copy.deepcopy(self.model)
        self.skipped = {}
        budget = MemoryBudget()  # palett_max_mem bounds the DKM memory of the whole model
        for planned in self.config.plan(model):
            module, cfg = planned.module, planned.config
            if planned.selected:
                make_dense(module, planned.param_name)  # a finalized weight trains again from its LUT[indices] values
                weight = getattr(module, planned.param_name)
                settings = DKMLayerSettings.from_config(cfg)
                fp = FakePalettize(planned.spec, settings, tuple(weight.shape), name=planned.name).to(weight.device)
                fp.memory_budget = budget
                parametrize.register_parametrization(module, planned.param_name, fp, unsafe=True)
                recompute.install(module)
                heap.install(module)
            else:
                self.skipped[planned.name] = planned.reason
            if cfg.quantize_activations and is_supported(module) and not hasattr(module, "activation_fake_quant"):
                self._add_activation_quant(module, cfg)
        self.model = model
        self._sync_enabled()
        return model

    @staticmethod
    def _add_activation_quant(module: nn.Module, cfg: ModuleDKMPalettizerConfig) -> None:
        from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

        module.activation_fake_quant = FakeQuantize(
            observer=MovingAverageMinMaxObserver, quant_min=cfg.quant_min, quant_max=cfg.quant_max,
            dtype=cfg.dtype, qscheme=torch.per_tensor_affine,
        )
        module.register_forward_hook(_activation_hook)

    # ------------------------------------------------------------------------------------ step
    def step(self) -> None:
        """Count one training step; layers whose ``milestone`` is reached start palettizing, layers in the hard phase
        (``hard_fraction``, see dkm_palett.schedule) move their LUT to the means of their clusters, and with
        ``sensitivity_weighted`` each layer folds the step's squared gradients into its estimate."""
        for _, module, param_name, fp in fake_palettizers(self.model):
            fp.fold_sensitivity()
            if fp.hard and bool(fp.enabled):
                fp.advance(getattr(module.parametrizations, param_name).original)
        self.step_count += 1
        self._sync_enabled()

    def _sync_enabled(self) -> None:
        layers = [fp for _, _, _, fp in fake_palettizers(self.model)]
        for fp in layers:
            fp.enabled.fill_(self.step_count >= fp.settings.milestone)
            total = fp.settings.total_steps or self.total_steps
            fp.hard = schedule.hard_phase(fp.settings, self.step_count, total)
        if not self.show_progress:
            return
        pending = [fp for fp in layers if fp.init_progress is None and self.step_count >= fp.settings.milestone
                   and not bool(fp.initialized)]
        if pending:  # these initialise in their next forward
            bar = LayerProgress(len(pending), "DKM k-means init", progress=True)
            for fp in pending:
                fp.init_progress = bar

    def state_dict(self) -> dict:
        return {"step_count": int(self.step_count), "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps = state.get("total_steps", self.total_steps)
        self._sync_enabled()

    # ------------------------------------------------------------------------------------ finalize
    def finalize(self, model: Optional[nn.Module] = None, inplace: bool = False) -> nn.Module:
        """Replace every DKM layer by a :class:`~dkm_palett.palettized_weight.PalettizedWeight`: the frozen weight
        ``LUT[indices]``, stored as its record (LUT, uint8 indices, scales), which ``state_dict`` carries."""
        model = self.model if model is None else model
        if not inplace:
            model = copy.deepcopy(model)
        self._final_stats, self._final_histograms = {}, {}
        heap.release()  # finalize's per-layer work under glibc's defaults (training tuned the heap for reuse)
        layers = list(fake_palettizers(model))
        for full, module, param_name, fp in progress_bar(layers, self.show_progress, "DKM finalize"):
            original = getattr(module.parametrizations, param_name).original.detach()
            record = fp.to_palettized(original)
            stats = record_stats(record, original)
            stats.update(enabled=bool(fp.enabled), steps=int(fp.steps))
            self._final_stats[full] = stats
            self._final_histograms[full] = weight_histogram(original, record)
            parametrize.remove_parametrizations(module, param_name, leave_parametrized=False)
            attach(module, param_name, record)
        for module in model.modules():
            if not any(True for _ in fake_palettizers(module)):
                recompute.uninstall(module)
                heap.uninstall(module)
        if model is self.model or inplace:
            self.model = model
        return model

    def records(self) -> dict[str, PalettizedTensor]:
        """``{weight name: record}`` of the finalized (palettized) weights of ``self.model``."""
        return {name: record for name, _, _, record in palettized_tensors(self.model)}

    def forget_records(self) -> int:
        """Turn the finalized weights of ``self.model`` back into plain trainable parameters of the same values
        (dropping their LUT/indices records), e.g. before training a finalized model again. Returns how many."""
        records = list(palettized_tensors(self.model))
        for _, module, param_name, _ in records:
            make_dense(module, param_name)
        return len(records)

    def restore_records(self, records: dict[str, Optional[PalettizedTensor]]) -> None:
        """Take back the DKM layers of the weights named in ``records`` and give each its earlier record back
        (None: a plain weight); what a fit that fails before training does with the weights it prepared."""
        for name, record in records.items():
            module_name, _, param_name = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if parametrize.is_parametrized(module, param_name):
                parametrize.remove_parametrizations(module, param_name, leave_parametrized=False)
            if record is not None:
                attach(module, param_name, record)

    # ------------------------------------------------------------------------------------ report
    def report(self) -> Report:
        """Per-weight statistics: clusters, cluster_dim, parameters, LUT dtype, bits, RMS clustering error; prints
        as a table, renders as HTML in Jupyter, ``report.plot()`` draws the weight histograms with the LUTs."""
        rows: dict[str, dict] = {}
        records, histograms = {}, dict(self._final_histograms)
        for full, module, param_name, fp in fake_palettizers(self.model):
            original = getattr(module.parametrizations, param_name).original.detach()
            records[full] = fp.to_palettized(original)
            stats = record_stats(records[full], original)
            stats.update(enabled=bool(fp.enabled), steps=int(fp.steps))
            rows[full] = stats
            histograms[full] = weight_histogram(original, records[full])
        for full, _, _, record in palettized_tensors(self.model):
            rows.setdefault(full, self._final_stats.get(full) or record_stats(record, None))
            records.setdefault(full, record)
        for name, reason in self.skipped.items():
            rows[name] = skipped_stats(reason)
        return Report(rows, records, {k: v for k, v in histograms.items() if k in records})
