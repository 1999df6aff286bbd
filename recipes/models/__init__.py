"""Small networks for the recipes (every main layer is large enough to be palettized)."""

from recipes.models.char_transformer import CharTransformer
from recipes.models.cnn import SmallCNN

__all__ = ["CharTransformer", "SmallCNN"]
