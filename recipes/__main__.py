"""``python -m dkm_palett.recipes`` runs the same app as ``python -m dkm_palett.recipes.train``."""

from dkm_palett.recipes.train import main

main()
