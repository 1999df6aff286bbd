"""LightningDataModules over data that ships with installed packages (nothing is downloaded)."""

from recipes.data.charlm import CharLMDataModule
from recipes.data.digits import DigitsDataModule
from recipes.data.mnist5k import MNIST5kDataModule

__all__ = ["CharLMDataModule", "DigitsDataModule", "MNIST5kDataModule"]
