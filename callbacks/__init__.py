"""Lightning callbacks for dkm_palett (they import lightning; the core engine modules never do)."""

from dkm_palett.callbacks.dkm_palettization import DKMPalettizationCallback

__all__ = ["DKMPalettizationCallback"]
