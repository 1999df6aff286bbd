"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""

from __future__ import annotations

import numpy as np

from dkm_palett.recipes.data.arrays import ArrayImageDataModule


class DigitsDataModule(ArrayImageDataModule):
    """``sklearn.datasets.load_digits`` as ``(N, 1, 8, 8)`` images."""

    num_classes = 10
    input_shape = (1, 8, 8)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0).reshape(-1, 1, 8, 8), digits.target
