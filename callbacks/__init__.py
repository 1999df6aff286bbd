"""Lightning callbacks for dkm_palett (imports lightning; the core package ``dkm_palett`` never does)."""

from callbacks.dkm_palettization import DKMPalettizationCallback

__all__ = ["DKMPalettizationCallback"]
