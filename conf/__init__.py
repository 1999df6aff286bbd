"""Hydra configs for ``dkm-palett-train`` (a package so they ship with ``pip install``)."""
