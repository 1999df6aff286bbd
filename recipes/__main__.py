"""``python -m recipes`` runs the same app as ``python -m recipes.train``."""

from recipes.train import main

main()
