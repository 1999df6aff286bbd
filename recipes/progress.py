"""The console of a recipe run: a progress bar labelled with the phase that is running when stdout is a terminal,
one line per epoch otherwise (a log file of a ``-m`` sweep stays readable)."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the phase (``baseline``, ``dkm 4-bit``, ``evaluate``) as its description, without
    the logger's ``v_num``, and without a finished bar left behind by each standalone validation."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase

    @property
    def validation_description(self) -> str:
        return f"{self.phase}: validation"

    def get_metrics(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.leave = False
        return bar

    def on_train_epoch_start(self, trainer: "L.Trainer", *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.phase} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


class PhaseLog(Callback):
    """One line per training epoch (``[dkm 4-bit] epoch 2/4: train_loss=0.1234 ...``) instead of a bar."""

    def __init__(self, phase: str):
        self.phase = phase

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        metrics = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(trainer.progress_bar_metrics.items()) if k != "v_num")
        print(f"[{self.phase}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {metrics}".rstrip(), flush=True)


def console_callbacks(phase: str, enabled: bool, training: bool) -> tuple[list, bool]:
    """The progress callbacks of a phase and the Trainer's ``enable_progress_bar``: a labelled bar on a terminal,
    epoch lines (training only) when stdout is a file or a pipe, nothing when ``enabled`` is false."""
    if not enabled:
        return [], False
    if sys.stdout.isatty():
        return [PhaseProgressBar(phase)], True
    return ([PhaseLog(phase)] if training else []), False
