"""Exports of finalized palettized models: Core ML (``coreml``) and a portable compressed safetensors file."""

from dkm_palett.export.compressed import load_compressed, save_compressed

__all__ = ["export_coreml", "read_back_lut_weights", "load_compressed", "save_compressed"]


def __getattr__(name):  # coremltools is optional: import the Core ML export lazily
    if name in ("export_coreml", "read_back_lut_weights", "required_target", "load_program"):
        from dkm_palett.export import coreml

        return getattr(coreml, name)
    raise AttributeError(f"module 'dkm_palett.export' has no attribute {name!r}")
