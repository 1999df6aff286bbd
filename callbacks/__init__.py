"""Lightning callbacks for dkm_palett (they import lightning; the core engine modules never do)."""

from dkm_palett.callbacks.dkm_palettization import DKMPalettizationCallback
from dkm_palett.callbacks.lifecycle import ExportError, export_target

__all__ = ["DKMPalettizationCallback", "ExportError", "export_target"]
