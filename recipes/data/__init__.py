"""LightningDataModules over data that ships with installed packages (nothing is downloaded)."""

from dkm_palett.recipes.data.charlm import CharLMDataModule
from dkm_palett.recipes.data.digits import DigitsDataModule
from dkm_palett.recipes.data.mnist5k import MNIST5kDataModule

__all__ = ["CharLMDataModule", "DigitsDataModule", "MNIST5kDataModule"]
