"""Hydra recipes: train a float baseline, DKM-palettize it, export it, report it (``python -m dkm_palett.recipes.train``)."""
