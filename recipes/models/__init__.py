"""Small networks for the recipes (every main layer is large enough to be palettized)."""

from dkm_palett.recipes.models.char_transformer import CharTransformer
from dkm_palett.recipes.models.cnn import SmallCNN

__all__ = ["CharTransformer", "SmallCNN"]
