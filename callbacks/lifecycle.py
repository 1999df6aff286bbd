"""What DKMPalettizationCallback keeps across fits and ranks: which palettizer prepared a module (its step count),
taking back a preparation when fit fails before training, the export target, and one error for every DDP rank."""

from __future__ import annotations

import weakref
from typing import Optional

import lightning as L
import torch

from dkm_palett.palettizer import DKMPalettizer, fake_palettizers

# the palettizer that last prepared each module: a fresh callback on a still-prepared module continues its step count
PALETTIZERS: "weakref.WeakKeyDictionary[torch.nn.Module, DKMPalettizer]" = weakref.WeakKeyDictionary()


# A buffer on a prepared LightningModule, so its checkpoints hold this key: a plain ``LitModule.load_from_checkpoint``
# of a mid-palettization checkpoint then fails with torch's "Unexpected key(s)" error, and this key says what to use.
MARKER = "dkm_palett_prepared__load_with__DKMPalettizationCallback_load_prepared"


def mark_prepared(module: torch.nn.Module, prepared: bool) -> None:
    """Add (``prepared``) or remove the :data:`MARKER` buffer."""
    if prepared and MARKER not in module._buffers:
        module.register_buffer(MARKER, torch.zeros(0))
    elif not prepared and MARKER in module._buffers:
        delattr(module, MARKER)


class ExportError(RuntimeError):
    """The export failed on global rank 0; every rank raises this, with the same message."""


def export_target(module: torch.nn.Module, name: Optional[str], field: str = "export_module") -> torch.nn.Module:
    """``module`` itself (``name`` None or empty), or its submodule ``name``; else a ValueError naming ``field``."""
    if not name:
        return module
    target = getattr(module, name, None)
    if not isinstance(target, torch.nn.Module):
        raise ValueError(f"{field}={name!r}: the LightningModule has no submodule of that name; set {field} to None "
                         "(null in a config) to export the whole LightningModule.")
    return target


def is_prepared(module: torch.nn.Module) -> bool:
    return any(True for _ in fake_palettizers(module))


def check_untracked(module: torch.nn.Module) -> None:
    """A module prepared elsewhere is fine at step 0, but not once a layer is past its milestone."""
    for name, _, _, fp in fake_palettizers(module):
        if bool(fp.enabled) and fp.settings.milestone > 0:
            raise ValueError(
                f"the module is already prepared and {name} is past its milestone ({fp.settings.milestone}), but this "
                "DKMPalettizationCallback does not know its step count; resume with trainer.fit(..., ckpt_path=...), "
                "reuse the callback that prepared it, or load it with DKMPalettizationCallback.load_prepared.")


def unprepare(model: torch.nn.Module) -> None:
    """Forget the palettizer of ``model`` after its DKM layers were taken back
    (:meth:`DKMPalettizer.restore_records`)."""
    PALETTIZERS.pop(model, None)
    mark_prepared(model, is_prepared(model))


def raise_on_every_rank(trainer: "L.Trainer", error: Optional[BaseException], what: str) -> None:
    """Rank 0 caught ``error`` (or None): every rank raises the same :class:`ExportError`, so none waits forever
    for rank 0 or reports a closed connection instead of the cause. One process: ``error`` itself."""
    message = None if error is None else f"DKMPalettizationCallback: {what}: {type(error).__name__}: {error}"
    if trainer.world_size > 1:
        message = trainer.strategy.broadcast(message, src=0)
    if message is None:
        return
    if trainer.world_size == 1:
        raise error
    raise ExportError(message) from error
